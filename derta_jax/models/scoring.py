"""Scoring text without generating it: one forward pass over a batch of token sequences.

Why: a guard model judges a response from ONE forward pass (P("unsafe") at the last
prompt position, derta_jax/eval/guard_classifier.py), and the refusal probe reads
P(refusal token) at every position of a harmful answer (eval/refusal_probability.py). A
7-13B guard or a 70B tuned model on a pod must be scored where it runs, on the mesh with
the trainer's shardings, not on one host; these are those forward passes, batched and
sharded like decoding (models/decode.py).

    logits = next_token_logits(model, [ids_a, ids_b], mesh=mesh)   # float32 [2, vocab]
    rows = token_log_probs(model, [ids_a, ids_b], sorry_id)        # [len(ids_a)], [len(ids_b)]

Prompts are left-padded (padding in segment 0, never attended; RoPE positions from each
row's first real token) to a multiple of `width_multiple`, so prompts of nearby lengths
share one compiled program; on a mesh the rows are split over the batch axes (padded
with dummy rows to a multiple) and the logits gathered back to the host.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from derta_jax.models.decode import batch_rows
from derta_jax.models.sharding import fetch_global


@functools.partial(jax.jit, static_argnums=(0,))
def _last_logits(graphdef, state, ids, positions, segments):
    model = nnx.merge(graphdef, state)
    hidden, _ = model(ids, positions, segments)
    return model.logits(hidden[:, -1:])[:, 0]


def next_token_logits(model: Any, prompts: Sequence[Sequence[int]], *,
                      mesh: Optional[jax.sharding.Mesh] = None, width_multiple: int = 16,
                      pad_id: int = 0) -> np.ndarray:
    """float32 [len(prompts), vocab]: the logits of the token after each prompt.
    mesh: the model's weights already placed on it (derta_jax.weights.load_model(mesh=))."""
    _, inputs = batch_rows(prompts, pad_id, mesh, width_multiple)
    graphdef, state = nnx.split(model)
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        logits = _last_logits(graphdef, state, *inputs)
    return fetch_global(logits)[:len(prompts)]


# positions whose [rows, chunk, vocab] float32 logits exist at once in token_log_probs
LOGITS_CHUNK = 64


@functools.partial(jax.jit, static_argnums=(0,))
def _token_log_probs(graphdef, state, ids, positions, segments, token_id):
    model = nnx.merge(graphdef, state)
    hidden, _ = model(ids, positions, segments)
    rows, width, dim = hidden.shape
    chunk = math.gcd(width, LOGITS_CHUNK)
    unembedding = model.unembedding()

    def one(h):  # [rows, chunk, D] -> [rows, chunk]: the logits never exist for every position
        logits = jnp.einsum("btd,dv->btv", h, unembedding, preferred_element_type=jnp.float32)
        return jax.nn.log_softmax(logits, axis=-1)[..., token_id]

    chunks = hidden.reshape(rows, width // chunk, chunk, dim).swapaxes(0, 1)
    return jax.lax.map(one, chunks).swapaxes(0, 1).reshape(rows, width)


def token_log_probs(model: Any, sequences: Sequence[Sequence[int]], token_id: int, *,
                    mesh: Optional[jax.sharding.Mesh] = None, width_multiple: int = 64,
                    pad_id: int = 0, min_rows: int = 0) -> list[np.ndarray]:
    """Per sequence, float32 [len(sequence)]: entry p is log P(token_id | sequence[:p+1]),
    the log-probability that `token_id` comes next after position p. One batched forward
    pass; the float32 logits exist LOGITS_CHUNK positions at a time; min_rows pads a
    short batch with dummy rows (one compiled program for every batch)."""
    if not 0 <= token_id < model.config.vocab_size:
        raise ValueError(f"token_log_probs: token id {token_id} is outside the vocabulary "
                         f"(size {model.config.vocab_size})")
    _, inputs = batch_rows(sequences, pad_id, mesh, width_multiple, min_rows)
    graphdef, state = nnx.split(model)
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        out = fetch_global(_token_log_probs(graphdef, state, *inputs, np.int32(token_id)))
    width = out.shape[1]  # rows are left-padded: each sequence ends at the last column
    return [out[row, width - len(sequence):] for row, sequence in enumerate(sequences)]
