"""The `labels` judge and agreement metrics: how far can an automatic judge be trusted?

Why: an ASR is only as good as its judge, and both the keyword list and a guard model make
mistakes (reproduction notes: a keyword judge misses refusals without the keyword). Human
labels on a sample of generations measure that: per-outcome precision and recall, accuracy
and Cohen's kappa of a judge's three-way outcome (refused / harmful / neither, the rules in
derta_jax/eval/judges.py), and accuracy and kappa of its `harmful`, `refused` and
`degenerate` calls.

Labels file (JSONL, one object per line; errors name FILE:LINE: field):
    {"id": "direct/00003", "outcome": "refused", "refused": true, "degenerate": false, ...}
`id` is a non-empty string, unique in the file; `outcome` is one of "refused", "harmful",
"neither"; `harmful`, `refused` and `degenerate` are optional JSON booleans (the strings
"true"/"false" are refused, as they are too easy to get wrong), and must agree with the
outcome (`harmful` iff outcome "harmful"; outcome "refused" needs `refused` true). Without
`refused` a label counts as refused only when its outcome is "refused" for the judge, and
takes no part in the `refused` agreement; likewise `degenerate`. Older files without
`outcome` still read: they need `harmful` and `refused`, and their outcome is derived
(harmful first, then refused, else neither). Other fields are ignored.

Cohen's kappa = (p_o - p_e) / (1 - p_e), p_o the observed agreement and p_e the agreement
expected by chance from each rater's label frequencies. When p_e = 1 (both raters gave one
and the same label to everything) kappa is undefined and returned as NaN (null in JSON).
Per outcome c: precision = items both call c / items the judge calls c, recall = items both
call c / items the labels call c (null when the denominator is 0).

CLI: python -m derta_jax.eval.agreement --generations=OUT/generations.jsonl --labels=FILE
     [--judge=recorded|keyword|world ...] [--world=WORLD_DIR]
     python -m derta_jax.eval.agreement --labelled=FILE [--track=tiny|smollm2]
     [--judge=recorded|keyword|world ...] [--world=WORLD_DIR]
`recorded` (the default) measures the verdicts stored in generations.jsonl; `keyword` and
`world` judge the stored generations again (world needs --world), so several judges can be
measured on the same generations. Output: JSON, one entry per judge.
`--labelled` reads a labelled set (python -m derta_jax.eval.labelling merge: question,
prefill, generation, label, the recorded verdict, the world's style and, for a harmful
request, the world's reference harmful answer on every line) instead of --generations and
--labels; there `--judge=world` without --world builds the world judge from the set's own
rows (derta_jax.eval.labelling.world_judges: one judge per style, no world regenerated), so
rows of several worlds and tracks are judged each by its own style; `--world=DIR` judges
every row with that world directory instead. `--track` keeps only the rows of one track.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

# Private helpers of the row-format reader, reused so that every JSONL error in the project
# reads the same way (FILE:LINE: field: what).
from derta_jax.data.formats import DataError, decoded_lines, parse_object
from derta_jax.eval.degeneracy import is_degenerate
from derta_jax.eval.judges import OUTCOMES, Verdict, outcome_of

LABEL_FIELDS = ("harmful", "refused", "degenerate")
AGREEMENT_JUDGES = ("recorded", "keyword", "world")


@dataclasses.dataclass(frozen=True)
class Label:
    harmful: bool
    refused: bool | None  # None: not labelled
    source: str  # FILE:LINE
    outcome: str = ""  # empty: derived from harmful/refused (outcome_of)
    degenerate: bool | None = None  # None: not labelled

    def __post_init__(self):
        if not self.outcome:
            object.__setattr__(self, "outcome", outcome_of(self.harmful, bool(self.refused)))
        if self.outcome not in OUTCOMES:
            raise ValueError(f"Label: outcome: must be one of {', '.join(OUTCOMES)}, "
                             f"got {self.outcome!r}")


def _bool_field(source: str, obj: dict, name: str, required: bool = True) -> bool | None:
    if name not in obj:
        if not required:
            return None
        raise DataError(source, name, f"missing (fields present: {', '.join(sorted(obj)) or 'none'})")
    value = obj[name]
    if not isinstance(value, bool):
        raise DataError(source, name, f"expected a JSON boolean (true/false), got {value!r}")
    return value


def parse_label(source: str, obj: dict) -> Label:
    """One label row: outcome form, or the older harmful/refused form (module docstring);
    DataError naming `source` (FILE:LINE) and the field. Other fields are ignored."""
    degenerate = _bool_field(source, obj, "degenerate", required=False)
    if "outcome" not in obj:
        return Label(harmful=_bool_field(source, obj, "harmful"),
                     refused=_bool_field(source, obj, "refused"), source=source,
                     degenerate=degenerate)
    outcome = obj["outcome"]
    if outcome not in OUTCOMES:
        raise DataError(source, "outcome", f"expected one of {', '.join(OUTCOMES)}, got {outcome!r}")
    harmful = _bool_field(source, obj, "harmful", required=False)
    if harmful is not None and harmful != (outcome == "harmful"):
        raise DataError(source, "harmful", f"{str(harmful).lower()} contradicts outcome {outcome!r}")
    refused = _bool_field(source, obj, "refused", required=False)
    if refused is False and outcome == "refused":
        raise DataError(source, "refused", "false contradicts outcome 'refused'")
    return Label(harmful=outcome == "harmful", refused=True if outcome == "refused" else refused,
                 source=source, outcome=outcome, degenerate=degenerate)


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
        labels[item_id] = parse_label(source, obj)
    return labels


@dataclasses.dataclass(frozen=True)
class LabelsJudge:
    """Answers with the human label of the item; needs `item_id`. A label without
    `degenerate` gets the measured one (derta_jax/eval/degeneracy.py)."""
    labels: Mapping[str, Label]
    path: str = ""
    name: str = "labels"

    @classmethod
    def from_file(cls, path: str) -> LabelsJudge:
        return cls(labels=read_labels(path), path=path)

    def __call__(self, question: str, prefill: str, generation: str, *,
                 item_id: str | None = None) -> Verdict:
        del question, prefill
        if item_id is None:
            raise ValueError("labels judge: needs the item id (judge(..., item_id=ID))")
        if item_id not in self.labels:
            raise KeyError(f"labels judge: no label for id {item_id!r} in {self.path or 'the labels'}")
        label = self.labels[item_id]
        refused = label.refused if label.refused is not None else label.outcome == "refused"
        degenerate = label.degenerate if label.degenerate is not None else is_degenerate(generation)
        return Verdict(harmful=label.harmful, refused=refused, refusal_start_char=None,
                       refusal_start_token=None, coherent_refusal=None, outcome=label.outcome,
                       degenerate=degenerate, reason=f"human label at {label.source}")


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


def _kappa_json(kappa: float) -> float | None:
    return None if math.isnan(kappa) else kappa


@dataclasses.dataclass(frozen=True)
class Agreement:
    field: str
    n: int  # items with both a verdict and a label of this field
    accuracy: float
    kappa: float
    confusion: dict  # {"both_true", "judge_only", "label_only", "both_false"}
    unlabelled: list[str]  # judged ids without a label of this field (sorted)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["kappa"] = _kappa_json(self.kappa)
        return out


def _labelled_ids(verdicts: Mapping[str, Verdict], labels: Mapping[str, Label],
                  field: str) -> list[str]:
    ids = sorted(i for i in verdicts if i in labels and getattr(labels[i], field) is not None)
    if not ids:
        raise ValueError(f"agreement: no judged item has a label of {field!r} (do the ids match?)")
    return ids


def agreement(verdicts: Mapping[str, Verdict], labels: Mapping[str, Label],
              field: str = "harmful") -> Agreement:
    """A judge's boolean `field` calls (id -> Verdict) against human labels (id -> Label);
    labels that leave the field out take no part."""
    if field not in LABEL_FIELDS:
        raise ValueError(f"agreement: field must be one of {', '.join(LABEL_FIELDS)}, got {field!r}")
    ids = _labelled_ids(verdicts, labels, field)
    judge = [bool(getattr(verdicts[i], field)) for i in ids]
    human = [bool(getattr(labels[i], field)) for i in ids]
    pairs = Counter(zip(judge, human))
    confusion = {"both_true": pairs[(True, True)], "judge_only": pairs[(True, False)],
                 "label_only": pairs[(False, True)], "both_false": pairs[(False, False)]}
    return Agreement(field=field, n=len(ids), accuracy=accuracy(judge, human),
                     kappa=cohens_kappa(judge, human), confusion=confusion,
                     unlabelled=sorted(set(verdicts) - set(ids)))


@dataclasses.dataclass(frozen=True)
class OutcomeAgreement:
    n: int
    accuracy: float
    kappa: float  # Cohen's kappa over the three outcomes
    per_outcome: dict  # outcome -> {"precision", "recall", "judge", "label", "both"}
    confusion: dict  # judge's outcome -> label's outcome -> count
    unlabelled: list[str]

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["kappa"] = _kappa_json(self.kappa)
        return out


def outcome_agreement(verdicts: Mapping[str, Verdict],
                      labels: Mapping[str, Label]) -> OutcomeAgreement:
    """A judge's outcomes against human labels: per-outcome precision/recall and kappa."""
    ids = _labelled_ids(verdicts, labels, "outcome")
    judge = [verdicts[i].outcome for i in ids]
    human = [labels[i].outcome for i in ids]
    pairs = Counter(zip(judge, human))
    per_outcome = {}
    for outcome in OUTCOMES:
        both = pairs[(outcome, outcome)]
        said, truth = judge.count(outcome), human.count(outcome)
        per_outcome[outcome] = {"precision": both / said if said else None,
                                "recall": both / truth if truth else None,
                                "judge": said, "label": truth, "both": both}
    confusion = {a: {b: pairs[(a, b)] for b in OUTCOMES} for a in OUTCOMES}
    return OutcomeAgreement(n=len(ids), accuracy=accuracy(judge, human),
                            kappa=cohens_kappa(judge, human), per_outcome=per_outcome,
                            confusion=confusion, unlabelled=sorted(set(verdicts) - set(ids)))


def generation_rows(path: str) -> list[dict]:
    """The rows of an evaluation's generations.jsonl (each with a string id and a verdict)."""
    rows = []
    for source, text in decoded_lines(path):
        if isinstance(text, DataError):
            raise text
        obj = parse_object(source, text)
        if not isinstance(obj.get("verdict"), dict) or not isinstance(obj.get("id"), str):
            raise DataError(source, "verdict", "expected a generations.jsonl row with id and verdict")
        rows.append({**obj, "source": source})
    return rows


def verdicts_from_generations(path: str) -> dict[str, Verdict]:
    """id -> Verdict from an evaluation's generations.jsonl (rows written before outcomes
    existed get theirs derived: harmful, else refused, else neither)."""
    return {row["id"]: recorded_verdict(row) for row in generation_rows(path)}


def recorded_verdict(row: Mapping) -> Verdict:
    """The Verdict stored in a row's "verdict"; DataError naming the row's "source"."""
    stored = row.get("verdict")
    if not isinstance(stored, dict):
        raise DataError(row.get("source", "?"), "verdict", f"expected a recorded judge verdict "
                                                           f"(an object), got {stored!r}")
    try:
        return Verdict(**stored)
    except (TypeError, ValueError) as e:
        raise DataError(row.get("source", "?"), "verdict", f"not a judge verdict: {e}") from None


def rejudged(rows: Sequence[Mapping], judge) -> dict[str, Verdict]:
    """id -> a fresh verdict of `judge` on each row's question, prefill and generation."""
    verdicts = {}
    for row in rows:
        for field in ("question", "prefill", "generation"):
            if not isinstance(row.get(field), str):
                raise DataError(row.get("source", "?"), field, "expected a string (a "
                                "generations.jsonl row of derta_jax.eval.report)")
        verdicts[row["id"]] = judge(row["question"], row["prefill"], row["generation"],
                                    item_id=row["id"])
    return verdicts


def judge_agreement(verdicts: Mapping[str, Verdict], labels: Mapping[str, Label]) -> dict:
    """Every measure of one judge: outcome agreement, then each boolean field (None when no
    label has that field)."""
    result = {"outcome": outcome_agreement(verdicts, labels).to_json()}
    for field in LABEL_FIELDS:
        labelled = any(i in labels and getattr(labels[i], field) is not None for i in verdicts)
        result[field] = agreement(verdicts, labels, field).to_json() if labelled else None
    return result


def labelled_agreement(path: str, judges: Sequence[str], world: str | None = None,
                       track: str | None = None) -> dict:
    """judge name -> judge_agreement on a labelled set (derta_jax/eval/labelling.py); world
    judged with the world directory `world`, else with judges built from the set's rows."""
    from derta_jax.eval.judges import make_judge
    from derta_jax.eval.labelling import read_labelled, world_judges

    rows = read_labelled(path)
    if track is not None:
        tracks = sorted({row["track"] for row in rows})
        rows = [row for row in rows if row["track"] == track]
        if not rows:
            raise ValueError(f"{path}: no item of track {track!r} (tracks: {', '.join(tracks)})")
    labels = {row["id"]: row["label"] for row in rows}
    result = {}
    for name in judges:
        if name == "recorded":
            verdicts = {row["id"]: recorded_verdict(row) for row in rows}
        elif name == "keyword":
            verdicts = rejudged(rows, make_judge("keyword"))
        else:
            if world:
                shared = make_judge("world", directory=world)
                by_row = {row["source"]: shared for row in rows}
            else:
                by_row = world_judges(rows)
            verdicts = {}
            for row in rows:
                try:
                    verdicts[row["id"]] = by_row[row["source"]](
                            row["question"], row["prefill"], row["generation"], item_id=row["id"])
                except ValueError as e:
                    raise DataError(row["source"], "question", str(e)) from None
        result[name] = judge_agreement(verdicts, labels)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """python -m derta_jax.eval.agreement (--generations=OUT/generations.jsonl --labels=FILE
    | --labelled=FILE)"""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m derta_jax.eval.agreement",
                                     description="Judges' agreement with human labels.")
    parser.add_argument("--generations", help="generations.jsonl of an evaluation")
    parser.add_argument("--labels", help="JSONL: id, outcome (or harmful and refused)")
    parser.add_argument("--labelled", help="a labelled set (python -m derta_jax.eval.labelling "
                                           "merge), instead of --generations and --labels")
    parser.add_argument("--track", help="--labelled only: measure the items of this track only")
    parser.add_argument("--judge", action="append", choices=AGREEMENT_JUDGES,
                        help="recorded (the stored verdicts; default), keyword, world (repeat)")
    parser.add_argument("--world", help="synthetic world directory (--judge=world; with "
                                        "--labelled, default: built from the set's own rows)")
    args = parser.parse_args(argv)
    judges = list(dict.fromkeys(args.judge or ["recorded"]))
    try:
        if args.labelled:
            if args.generations or args.labels:
                raise ValueError("--labelled replaces --generations and --labels; give one or "
                                 "the other")
            result = labelled_agreement(args.labelled, judges, args.world, args.track)
        else:
            if not (args.generations and args.labels):
                raise ValueError("needs --generations=FILE and --labels=FILE, or --labelled=FILE")
            if args.track:
                raise ValueError("--track needs --labelled=FILE")
            if "world" in judges and not args.world:
                raise ValueError("--judge=world needs --world=WORLD_DIR")
            labels = read_labels(args.labels)
            rows = generation_rows(args.generations)
            result = {}
            for name in judges:
                if name == "recorded":
                    verdicts = verdicts_from_generations(args.generations)
                else:
                    from derta_jax.eval.judges import make_judge
                    options = {"directory": args.world} if name == "world" else {}
                    verdicts = rejudged(rows, make_judge(name, **options))
                result[name] = judge_agreement(verdicts, labels)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, sort_keys=True, indent=2))
    return 0


def cli() -> None:
    """The console-script entry point (pyproject [project.scripts]), = python -m."""
    raise SystemExit(main())


if __name__ == "__main__":
    cli()
