"""Examples (prompt text, response text) to per-row token arrays of the Batch contract.

The one idea: tokenise `prompt + response` as ONE string and find the response by the
character offset where it starts (`return_offsets_mapping`). Tokenising the prompt alone
and masking that many tokens (the reference code) is wrong whenever a token spans the
boundary: BPE merges the prompt's last characters with the response's first, the joint
tokenisation has fewer prompt tokens than the separate one, and the mask shifts. Here a
token belongs to the response when it covers any response character; a token spanning
the boundary is therefore a response token (the model must produce it to say the response).

Per row (1-D, unpadded, length n <= max_length), with r0 the first response token:

    input_ids[t]               the tokens
    loss_mask[t]  = r0-1 <= t <= n-2      (positions whose next token is a response token)
    targets[t]    = input_ids[t+1] there  (MLE rows), or the refusal id (RTO rows); 0 elsewhere
    rto_mask[t]   = loss_mask[t] for RTO rows, else False

so an RTO row `prompt + r̂ + EOS` has |r̂|+1 RTO positions, from the last prompt token
through the last token of r̂ (whose next token is EOS).

BOS: the chat template renders its own special tokens, so nothing is added. For the other
templates BOS is prepended exactly when the tokenizer itself adds one (its
`add_special_tokens=True` output starts with `bos_token_id`: yes for Llama-3, no for
SmolLM2) and the text does not already start with it. `add_bos=True/False` overrides.

Truncation is explicit: rows longer than max_length keep their first max_length tokens;
a response that loses its end (EOS) is counted in `TokenizeReport.truncated`. A row whose
prompt leaves no response token inside max_length is an error (`DataError` naming the
row), or with `on_error="skip"` skipped and reported. Nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import itertools
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from derta_jax.data.formats import DataError, SkippedRow
from derta_jax.data.templates import Example, Template, template_identity

DEFAULT_REFUSAL = "Sorry"
TOKENIZE_VERSION = 1  # bump when the arrays this module produces change; part of cache keys


def refusal_token_id(tokenizer: Any, refusal: str = DEFAULT_REFUSAL) -> int:
    """The single token id of `refusal`; a ValueError listing the candidates otherwise."""
    ids = tokenizer.encode(refusal, add_special_tokens=False)
    if len(ids) == 1:
        return int(ids[0])
    pieces = tokenizer.convert_ids_to_tokens(ids)
    candidates = []
    for variant in (refusal, " " + refusal, "\u2581" + refusal, "\u0120" + refusal):
        token_id = tokenizer.convert_tokens_to_ids(variant)
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(token_id, int) and token_id != unk and (variant, token_id) not in candidates:
            candidates.append((variant, token_id))
    found = ", ".join(f"{v!r}={i}" for v, i in candidates) or "none"
    raise ValueError(
        f"refusal string {refusal!r} is {len(ids)} tokens under tokenizer "
        f"{getattr(tokenizer, 'name_or_path', '?')!r}: ids {list(ids)} ({pieces}); the RTO "
        f"target must be exactly one token. Single-token vocabulary entries for it: {found}. "
        f"Choose a refusal string that encodes to one token.")


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer's own encoding (add_special_tokens=True) starts with BOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


@dataclasses.dataclass
class TokenizeReport:
    rows: int = 0
    rto_rows: int = 0
    truncated: list[str] = dataclasses.field(default_factory=list)  # sources that lost EOS
    skipped: list[SkippedRow] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)  # tokens per kept row (after truncation)
    full_lengths: list[int] = dataclasses.field(default_factory=list)  # before truncation

    def summary(self) -> str:
        return (f"{self.rows} rows ({self.rto_rows} RTO), {len(self.truncated)} truncated "
                f"(response lost its EOS), {len(self.skipped)} skipped")


@dataclasses.dataclass(frozen=True)
class Tokenized:
    row: dict  # input_ids, targets, loss_mask, rto_mask (numpy) + kind, source (str)
    full_length: int  # tokens before truncation
    truncated: bool  # the response lost tokens (its EOS included)


def _require_offsets(tokenizer: Any) -> None:
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; masking "
                         f"by character offsets needs one (a tokenizer.json)")


def first_response_token(offsets: Sequence[tuple[int, int]], boundary: int) -> int:
    """Index of the first token that covers any character at or after `boundary`."""
    for index, (_, end) in enumerate(offsets):
        if end > boundary:
            return index
    return len(offsets)


def tokenize_example(example: Example, tokenizer: Any, refusal_id: int, max_length: int,
                     add_bos: bool | None = None) -> Tokenized:
    """One Example to its row arrays; DataError if no response token fits in max_length."""
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    encoding = tokenizer(example.prompt + example.response, add_special_tokens=False,
                         return_offsets_mapping=True)
    return _row_from_encoding(example, encoding["input_ids"], encoding["offset_mapping"],
                              getattr(tokenizer, "bos_token_id", None) if add_bos else None,
                              refusal_id, max_length)


def _row_from_encoding(example: Example, ids: Sequence[int], offsets: Sequence[tuple[int, int]],
                       bos: int | None, refusal_id: int, max_length: int) -> Tokenized:
    ids, offsets = list(ids), list(offsets)
    if bos is not None and ids[:1] != [bos]:
        ids.insert(0, bos)
        offsets.insert(0, (0, 0))
    r0 = first_response_token(offsets, len(example.prompt))
    if r0 >= len(ids):
        raise DataError(example.source, "text", "the response produced no tokens")
    if r0 > max_length - 1:
        raise DataError(
            example.source, "prompt",
            f"prompt is {r0} tokens; max_length={max_length} leaves no room for the response")
    full_length = len(ids)
    ids = np.asarray(ids[:max_length], np.int32)
    n = ids.shape[0]
    loss_mask = np.zeros(n, np.bool_)
    loss_mask[max(r0 - 1, 0): n - 1] = True
    targets = np.zeros(n, np.int32)
    supervised = np.flatnonzero(loss_mask)
    targets[supervised] = refusal_id if example.rto else ids[supervised + 1]
    rto_mask = loss_mask.copy() if example.rto else np.zeros(n, np.bool_)
    row = {"input_ids": ids, "targets": targets, "loss_mask": loss_mask, "rto_mask": rto_mask,
           "kind": example.kind, "source": example.source}
    return Tokenized(row, full_length, full_length > max_length)


def tokenize_examples(examples: Sequence[Example], tokenizer: Any, refusal_id: int,
                      max_length: int, on_error: str = "raise", add_bos: bool | None = None,
                      batch_size: int = 256) -> tuple[list[dict], TokenizeReport]:
    """Every example to a row (the same arrays as tokenize_example, encoded in batches);
    the report counts truncations and lists skipped rows."""
    report = TokenizeReport()
    rows = list(iter_tokenized(examples, tokenizer, refusal_id, max_length, report,
                               on_error=on_error, add_bos=add_bos, batch_size=batch_size))
    return rows, report


def iter_tokenized(examples: Iterable[Example], tokenizer: Any, refusal_id: int,
                   max_length: int, report: TokenizeReport, on_error: str = "raise",
                   add_bos: bool | None = None, batch_size: int = 256) -> Iterator[dict]:
    """tokenize_examples, streamed: rows come out as `examples` are consumed (a batch at a
    time), so a million-row source never sits in memory; `report` fills as it goes."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f'on_error must be "raise" or "skip", got {on_error!r}')
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a prompt token and a response token), "
                         f"got {max_length}")
    _require_offsets(tokenizer)
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    examples = iter(examples)
    while batch := list(itertools.islice(examples, batch_size)):
        encodings = tokenizer([e.prompt + e.response for e in batch], add_special_tokens=False,
                              return_offsets_mapping=True)
        for i, example in enumerate(batch):
            try:
                result = _row_from_encoding(example, encodings["input_ids"][i],
                                            encodings["offset_mapping"][i], bos, refusal_id,
                                            max_length)
            except DataError as e:
                if on_error == "raise":
                    raise
                report.skipped.append(SkippedRow(e.source, f"{e.field}: {e.what}"))
                continue
            report.rows += 1
            report.rto_rows += int(example.rto)
            report.lengths.append(int(result.row["input_ids"].shape[0]))
            report.full_lengths.append(result.full_length)
            if result.truncated:
                report.truncated.append(example.source)
            yield result.row


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of everything that decides the tokenizer's ids: its tokenizer.json, specials, template."""
    _require_offsets(tokenizer)
    backend = tokenizer.backend_tokenizer
    identity = {
        "tokenizer_json": backend.to_str(),
        "bos": getattr(tokenizer, "bos_token", None),
        "eos": getattr(tokenizer, "eos_token", None),
        "adds_bos": tokenizer_adds_bos(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def cache_key(tokenizer: Any, template: "str | Template", max_length: int, refusal_id: int,
              add_bos: bool | None = None) -> str:
    """A readable key naming everything here that changes the arrays (the loader adds the
    data hash). `template` is a Template (its settings go into the key) or a name."""
    if not isinstance(template, str):
        template = template_identity(template)
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    return (f"tokenize-v{TOKENIZE_VERSION}-{template}-len{max_length}-refusal{refusal_id}-"
            f"bos{int(add_bos)}-tok{tokenizer_fingerprint(tokenizer)[:16]}")
