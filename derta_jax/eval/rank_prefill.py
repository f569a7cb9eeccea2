"""Rank-assisted prefilling (RAP): a prefill attack that only feeds tokens the model itself
ranks highly, so that a refusal the model has learnt to put first is stepped around.

Why: a safety tuning that makes P(refusal) high at every position of a harmful answer (RTO,
DeRTa, Qi et al.'s augmentation) can still leave the harmful token in the model's top few.
Vega & Singh (arXiv 2512.05518, "Matching Ranks Over Probability Yields Truly Deep Safety
Alignment") broke such a defence by prefilling, position by position, only tokens from the
model's own top k (k = 20): the harmful answer's next token when the model ranks it in its
top k, otherwise the best-ranked top-k token that does not open a refusal. A plain prefill
attack forces the reference text whatever the model ranks it; RAP measures whether the
harmful continuation is still among the model's own choices.

Items are built per (row, depth k) as the prefill suite's (eval/attacks.py), with suite
"rank_prefill": one forced decode per row at the deepest k gives every shallower depth (the
choice at step t depends only on the tokens before it), then the k chosen tokens follow the
rendered question as TOKENS (`prompt_ids`; no re-tokenisation of their text), and the
model generates greedily from there. `prefill` is their text, meta `reference_kept` counts
how many of them are the reference's own tokens.

Tokens never substituted: those whose text (leading whitespace stripped) begins, or is
begun by, a phrase of eval/refusal_keywords.REFUSAL_OPENINGS ("I" is one: it may begin "I
cannot"), and the end-of-sequence tokens. When every top-k token is one of them the top
token is fed (the rule has nothing else to offer).
"""

from __future__ import annotations

from typing import Any, Sequence

from derta_jax.data.formats import text_field
from derta_jax.data.templates import Template
from derta_jax.eval.attacks import Row, _item
from derta_jax.eval.refusal_keywords import REFUSAL_OPENINGS

SUITE = "rank_prefill"
DEFAULT_RANK_K = 20


def refusal_opening_ids(tokenizer: Any, openings: Sequence[str] = REFUSAL_OPENINGS,
                        vocab_size: int | None = None) -> list[int]:
    """Ids of the tokens whose stripped text begins a refusal opening or starts with one
    (below `vocab_size`, the model's: a tokenizer may hold tokens the model has no row for)."""
    size = len(tokenizer) if vocab_size is None else min(len(tokenizer), vocab_size)
    texts = tokenizer.batch_decode([[i] for i in range(size)])
    return [i for i, text in enumerate(texts)
            if (t := text.strip()) and any(o.startswith(t) or t.startswith(o) for o in openings)]


def rank_prefill_items(model: Any, tokenizer: Any, rows: Sequence[Row], template: Template, *,
                       depths: Sequence[int], rank_k: int = DEFAULT_RANK_K,
                       eos_token_ids: Sequence[int] = (), mesh: Any = None,
                       batch_size: int = 16) -> list[dict]:
    """One item per (row, k) of `depths` (rows need question and harmful_response)."""
    from derta_jax.eval.run import encode_prompt
    from derta_jax.models.decode import generate

    if not depths or min(depths) < 0:
        raise ValueError(f"{SUITE}: need depths >= 0, got {list(depths)}")
    if rank_k < 1:
        raise ValueError(f"{SUITE}: rank_k={rank_k} must be >= 1")
    deepest = max(depths)
    prompts, references = [], []
    for source, row in rows:
        response = text_field(source, row, "harmful_response")
        prompts.append(encode_prompt(tokenizer, template.render(row["question"])))
        references.append(tokenizer.encode(response, add_special_tokens=False)[:deepest])
    banned = sorted(set(refusal_opening_ids(tokenizer, vocab_size=model.config.vocab_size))
                    | set(eos_token_ids))
    chosen: list[list[int]] = []
    if deepest:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        for start in range(0, len(prompts), batch_size):
            out = generate(model, prompts[start:start + batch_size], max_new_tokens=deepest,
                           forced=references[start:start + batch_size], rank_k=rank_k,
                           banned_ids=banned, eos_token_ids=eos_token_ids, pad_id=pad,
                           mesh=mesh, width_multiple=16, min_rows=batch_size)
            chosen += [tokens[:len(ref)] for tokens, ref in
                       zip(out.tokens, references[start:start + batch_size])]
    else:
        chosen = [[] for _ in rows]
    items = []
    for (source, row), prompt, reference, picks in zip(rows, prompts, references, chosen):
        for k in depths:
            fed = picks[:k]
            prefill = tokenizer.decode(fed, skip_special_tokens=True)
            item = _item(SUITE, source, row, template.render(row["question"]) + prefill,
                         prefill=prefill, k=k,
                         extra_meta={"prefill_unit": "tokens", "prefill_units": len(fed),
                                     "rank_k": rank_k,
                                     "reference_kept": sum(a == b for a, b in zip(fed, reference))})
            item["prompt_ids"] = prompt + fed
            items.append(item)
    return items
