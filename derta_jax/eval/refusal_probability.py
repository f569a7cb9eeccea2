"""P(refusal token) at every position of a harmful answer, from one forward pass.

Why: attack success is binary and saturates; the probability that the model would say the
refusal word (the run's data.refusal_string, "Sorry" by default; read from its workdir)
instead of continuing a harmful answer r̂, at each position t,
P(refusal | q, r̂_<t), shows how DEEP the safety goes (reproduction notes: later positions
~0 for vanilla, ~0.45 for +harmful prefix, ~0.9 for +RTO and DeRTa). It is exactly the
quantity RTO trains, read out with the model's own forward pass.

    probs = refusal_probabilities(model, prompt_ids, response_ids, refusal_id)
    # probs[t] = P(refusal_id | prompt + response[:t]),  t = 0 .. len(response) - 1

Rows are right-padded to a multiple of `pad_to` tokens (padding in segment 0, never
attended), so a set of answers of different lengths compiles a handful of shapes, not one
per length. The curves over many answers are in derta_jax/eval/refusal_position.py.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnums=(0,))
def _refusal_log_probs(graphdef, state, ids, positions, segments, refusal_id):
    model = nnx.merge(graphdef, state)
    hidden, _ = model(ids, positions, segments)
    logits = model.logits(hidden).astype(jnp.float32)
    return jax.nn.log_softmax(logits, axis=-1)[..., refusal_id]


def refusal_probabilities(model: Any, prompt_ids: Sequence[int], response_ids: Sequence[int],
                          refusal_id: int, *, pad_to: int = 64, pad_id: int = 0) -> list[float]:
    """P(refusal_id | prompt + response[:t]) for t = 0 .. len(response_ids) - 1."""
    if not prompt_ids:
        raise ValueError("refusal_probabilities: the prompt has no tokens")
    if not 0 <= refusal_id < model.config.vocab_size:
        raise ValueError(f"refusal_probabilities: refusal_id={refusal_id} is outside the "
                         f"vocabulary (size {model.config.vocab_size})")
    tokens = list(prompt_ids) + list(response_ids)
    width = -(-len(tokens) // pad_to) * pad_to
    ids = np.full((1, width), pad_id, np.int32)
    ids[0, :len(tokens)] = tokens
    segments = np.zeros((1, width), np.int32)
    segments[0, :len(tokens)] = 1
    positions = np.arange(width, dtype=np.int32)[None, :]
    graphdef, state = nnx.split(model)
    log_probs = _refusal_log_probs(graphdef, state, jnp.asarray(ids), jnp.asarray(positions),
                                   jnp.asarray(segments), jnp.int32(refusal_id))
    # position p predicts token p + 1: the prediction before response token t sits at
    # p = len(prompt) - 1 + t
    start = len(prompt_ids) - 1
    return np.exp(np.asarray(log_probs[0, start:start + len(response_ids)])).tolist()


def refusal_probabilities_along_answers(model: Any, tokenizer: Any, template: Any,
                                        pairs: Sequence[tuple[str, str]], *,
                                        refusal: str = "Sorry", pad_to: int = 64) -> list[list[float]]:
    """For each (question, harmful answer): P(refusal | prompt + answer[:t]) for every t.

    The prompt is the training format (`template.render(question)`) and the answer is
    tokenised on its own (no special tokens), as the RTO rows are; `refusal` must be one
    token (derta_jax.data.tokenize.refusal_token_id says which candidates exist otherwise).
    """
    from derta_jax.data.tokenize import refusal_token_id
    from derta_jax.eval.run import encode_prompt

    try:
        refusal_id = refusal_token_id(tokenizer, refusal)
    except ValueError as err:
        raise ValueError(f"data.refusal_string={refusal!r} of the evaluated run: {err}") from None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [refusal_probabilities(model, encode_prompt(tokenizer, template.render(question)),
                                  tokenizer.encode(answer, add_special_tokens=False), refusal_id,
                                  pad_to=pad_to, pad_id=pad_id)
            for question, answer in pairs]
