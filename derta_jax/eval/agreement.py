"""The `labels` judge and agreement metrics: how far can an automatic judge be trusted?

Why: an ASR is only as good as its judge, and both the keyword list and a guard model make
mistakes (reproduction notes: a keyword judge misses refusals without the keyword). Human
labels on a sample of generations measure that: accuracy and Cohen's kappa of a judge's
`harmful` (or `refused`) calls against the labels.

Labels file (JSONL, one object per line; errors name FILE:LINE: field):
    {"id": "direct/00003", "harmful": false, "refused": true, ...}
`id` is a non-empty string, unique in the file; `harmful` and `refused` are JSON booleans
(the strings "true"/"false" are refused, as they are too easy to get wrong). Other fields
are ignored.

Cohen's kappa = (p_o - p_e) / (1 - p_e), p_o the observed agreement and p_e the agreement
expected by chance from each rater's label frequencies. When p_e = 1 (both raters gave one
and the same label to everything) kappa is undefined and returned as NaN.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Hashable, Mapping, Sequence

# Private helpers of the row-format reader, reused so that every JSONL error in the project
# reads the same way (FILE:LINE: field: what).
from derta_jax.data.formats import DataError, decoded_lines, parse_object
from derta_jax.eval.judges import Verdict

LABEL_FIELDS = ("harmful", "refused")


@dataclasses.dataclass(frozen=True)
class Label:
    harmful: bool
    refused: bool
    source: str  # FILE:LINE


def _bool_field(source: str, obj: dict, name: str) -> bool:
    if name not in obj:
        raise DataError(source, name, f"missing (fields present: {', '.join(sorted(obj)) or 'none'})")
    value = obj[name]
    if not isinstance(value, bool):
        raise DataError(source, name, f"expected a JSON boolean (true/false), got {value!r}")
    return value


def read_labels(path: str) -> dict[str, Label]:
    """id -> Label from a JSONL labels file; DataError (FILE:LINE: field: ...) on bad rows."""
    labels: dict[str, Label] = {}
    for source, text in decoded_lines(path):
        if isinstance(text, DataError):
            raise text
        obj = parse_object(source, text)
        item_id = obj.get("id")
        if not isinstance(item_id, str) or not item_id.strip():
            raise DataError(source, "id", f"expected a non-empty string, got {item_id!r}")
        if item_id in labels:
            raise DataError(source, "id", f"{item_id!r} already labelled at "
                                          f"{labels[item_id].source}")
        labels[item_id] = Label(harmful=_bool_field(source, obj, "harmful"),
                                refused=_bool_field(source, obj, "refused"), source=source)
    return labels


@dataclasses.dataclass(frozen=True)
class LabelsJudge:
    """Answers with the human label of the item; needs `item_id`."""
    labels: Mapping[str, Label]
    path: str = ""
    name: str = "labels"

    @classmethod
    def from_file(cls, path: str) -> "LabelsJudge":
        return cls(labels=read_labels(path), path=path)

    def __call__(self, question: str, prefill: str, generation: str, *,
                 item_id: str | None = None) -> Verdict:
        del question, prefill, generation
        if item_id is None:
            raise ValueError("labels judge: needs the item id (judge(..., item_id=ID))")
        if item_id not in self.labels:
            raise KeyError(f"labels judge: no label for id {item_id!r} in {self.path or 'the labels'}")
        label = self.labels[item_id]
        return Verdict(harmful=label.harmful, refused=label.refused, refusal_start_char=None,
                       refusal_start_token=None, coherent_refusal=None,
                       reason=f"human label at {label.source}")


def accuracy(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    _check_pairs(a, b, "accuracy")
    return sum(x == y for x, y in zip(a, b)) / len(a)


def cohens_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters' labels on the same items (any hashable categories)."""
    _check_pairs(a, b, "cohens_kappa")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    expected = sum(count_a[c] * count_b[c] for c in count_a) / (n * n)
    if expected == 1.0:
        return math.nan
    return (observed - expected) / (1.0 - expected)


def _check_pairs(a: Sequence, b: Sequence, caller: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{caller}: the two label lists differ in length ({len(a)} vs {len(b)})")
    if not a:
        raise ValueError(f"{caller}: no items")


@dataclasses.dataclass(frozen=True)
class Agreement:
    field: str
    n: int  # items with both a verdict and a label
    accuracy: float
    kappa: float
    confusion: dict  # {"both_true", "judge_only", "label_only", "both_false"}
    unlabelled: list[str]  # judged ids without a label (sorted)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["kappa"] = None if math.isnan(self.kappa) else self.kappa
        return out


def agreement(verdicts: Mapping[str, Verdict], labels: Mapping[str, Label],
              field: str = "harmful") -> Agreement:
    """A judge's `field` calls (id -> Verdict) against human labels (id -> Label)."""
    if field not in LABEL_FIELDS:
        raise ValueError(f"agreement: field must be one of {', '.join(LABEL_FIELDS)}, got {field!r}")
    ids = sorted(i for i in verdicts if i in labels)
    if not ids:
        raise ValueError("agreement: no judged item has a label (do the ids match?)")
    judge = [bool(getattr(verdicts[i], field)) for i in ids]
    human = [bool(getattr(labels[i], field)) for i in ids]
    pairs = Counter(zip(judge, human))
    confusion = {"both_true": pairs[(True, True)], "judge_only": pairs[(True, False)],
                 "label_only": pairs[(False, True)], "both_false": pairs[(False, False)]}
    return Agreement(field=field, n=len(ids), accuracy=accuracy(judge, human),
                     kappa=cohens_kappa(judge, human), confusion=confusion,
                     unlabelled=sorted(i for i in verdicts if i not in labels))


def verdicts_from_generations(path: str) -> dict[str, Verdict]:
    """id -> Verdict from an evaluation's generations.jsonl."""
    verdicts: dict[str, Verdict] = {}
    for source, text in decoded_lines(path):
        if isinstance(text, DataError):
            raise text
        obj = parse_object(source, text)
        verdict = obj.get("verdict")
        if not isinstance(verdict, dict) or not isinstance(obj.get("id"), str):
            raise DataError(source, "verdict", "expected a generations.jsonl row with id and verdict")
        try:
            verdicts[obj["id"]] = Verdict(**verdict)
        except TypeError as e:
            raise DataError(source, "verdict", f"not a judge verdict: {e}") from None
    return verdicts


def main(argv: Sequence[str] | None = None) -> int:
    """python -m derta_jax.eval.agreement --generations=OUT/generations.jsonl --labels=FILE"""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m derta_jax.eval.agreement",
                                     description="A judge's agreement with human labels.")
    parser.add_argument("--generations", required=True, help="generations.jsonl of an evaluation")
    parser.add_argument("--labels", required=True, help="JSONL: id, harmful, refused")
    args = parser.parse_args(argv)
    try:
        verdicts = verdicts_from_generations(args.generations)
        labels = read_labels(args.labels)
        result = {field: agreement(verdicts, labels, field).to_json() for field in LABEL_FIELDS}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, sort_keys=True, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
