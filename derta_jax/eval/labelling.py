"""A hand-labelled set of generations that the project owns: draw it, label it blind, merge it.

Why: `python -m derta_jax.eval.agreement` can only say how far a judge is trusted against
labels that are themselves trustworthy: drawn from every recipe and attack suite (not only
from where a judge is easy), labelled by a human who does not know which recipe wrote the
text (else "DeRTa refuses" leaks into the labels), and stored WITH the prompt and the
generation, so that the set outlives the reproduction directories it came from.
docs/labels/GUIDE.md is the labelling guide (outcomes refused / harmful / neither, and the
`refused` and `degenerate` booleans).

    python -m derta_jax.eval.labelling sample --reproduction=OUT [--reproduction=OUT2 ...]
        --n=N --seed=S --out=DIR [--overwrite]
    (a human labels DIR/blind.jsonl into labels.jsonl, following docs/labels/GUIDE.md)
    python -m derta_jax.eval.labelling merge --blind=DIR/blind.jsonl --key=DIR/key.jsonl
        --labels=labels.jsonl --out=labelled.jsonl [--overwrite]
    python -m derta_jax.eval.agreement --labelled=labelled.jsonl --judge=world --judge=keyword

`sample` reads reproduction outputs (python -m derta_jax.reproduce; tiny or smollm2 track):
OUT/report.json ("budget", "seeds", "recipes", "model": the track, absent for tiny),
OUT/world/world.json, OUT/base/eval/generations.jsonl and every
OUT/runs/RECIPE/seedS/eval/generations.jsonl that report.json's recipes x seeds name (a
missing one is an error: the reproduction is incomplete).

Stratification: a STRATUM is (reproduction, run, suite), the run being `base` or
RECIPE/seedS: each recipe at each seed, and the base, meets each suite in one stratum. The N items are spread as evenly as the strata allow: each stratum gets N // S
(S strata), a stratum smaller than its share gives all its rows and the rest is spread
again over the others, and the last remainder (fewer items than open strata) goes to
strata drawn at random. So every stratum gets at least one item (N < S is an error, and so
is N above the number of generations). Inside a stratum, rows are shuffled within each
prefill depth `k` and then taken in turn from each depth (the depths in a random order), so
a prefill stratum covers its depths evenly. Everything is drawn from random.Random(S):
same inputs and seed -> the same files, byte for byte.

Outputs of `sample` (an existing non-empty DIR is refused unless --overwrite, the rule of
derta_jax.paths.prepare_output_dir):
- DIR/blind.jsonl: what the labeller sees, and nothing else: {"id": "L0001", "suite", "k",
  "question", "prefill", "generation"}. The drawn items are shuffled and then numbered, so
  neither ids nor order tell the run.
- DIR/key.jsonl: what the labeller must not see, one line per id: "reproduction" (the
  directory as given), "track" (report.json "model", else "tiny"), "budget" (its name),
  "run", "recipe" ("base" for the base), "seed" (null for the base), "row_id" (the
  generations row's id), "source" (generations FILE:LINE), "held_out" and "category" (the
  row's meta), "recorded_judge" and "verdict" (the verdict stored in generations.jsonl),
  and "world": {"seed", "style", "trained", "held_out"} from world.json, "sizes" (the
  budget's world sizes), enough for derta_jax.data.synthetic.generate_world(seed,
  style=style, held_out=held_out, **sizes) to rebuild the world in memory, and
  "fingerprint" (world_fingerprint of OUT/world's rows), so that a world rebuilt by a
  CHANGED generator is refused rather than silently judging with other requests or steps.

`merge` joins blind, key and labels (one JSON object per line: "id", "outcome",
"refused", "degenerate", optional "note"; agreement.parse_label's rules, with `refused`
and `degenerate` required and `harmful` refused on a benign prompt, as the guide says)
into one self-contained labelled set, one line per id in id order:
    {"id", "track", "budget", "run", "recipe", "seed", "suite", "k", "held_out",
     "category", "question", "prefill", "generation", "outcome", "refused",
     "degenerate", "note", "row_id", "source", "reproduction", "recorded_judge",
     "verdict", "world"}
Every label id must be a blind id, and every blind id needs a label (an error says how many
are missing and names the first few); key and blind must hold the same ids.

Bad input of either command: one line "error: FILE:LINE: field: what" on stderr, exit
status 2, nothing written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from derta_jax.data.formats import DataError, decoded_lines, parse_object
from derta_jax.eval.agreement import Label, generation_rows, parse_label
from derta_jax.eval.report import BENIGN_SUITES

BLIND_FIELDS = ("id", "suite", "k", "question", "prefill", "generation")
KEY_FIELDS = ("id", "reproduction", "track", "budget", "run", "recipe", "seed", "row_id",
              "source", "held_out", "category", "recorded_judge", "verdict", "world")
LABELLED_FIELDS = ("id", "track", "budget", "run", "recipe", "seed", "suite", "k",
                   "held_out", "category", "question", "prefill", "generation", "outcome",
                   "refused", "degenerate", "note", "row_id", "source", "reproduction",
                   "recorded_judge", "verdict", "world")
WORLD_FIELDS = ("seed", "style", "trained", "held_out", "sizes", "fingerprint")
SAMPLE_OUTPUTS = ("blind.jsonl", "key.jsonl")
BASE_RUN = "base"
DEFAULT_TRACK = "tiny"  # report.json of the tiny track has no "model"
MISSING_IDS_SHOWN = 5
GUIDE = "docs/labels/GUIDE.md"


# ----------------------------------------------------------------------------- sample


def _read_json(path: str, directory: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; is {directory} the output directory of "
                                f"python -m derta_jax.reproduce?")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, "<file>", f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise DataError(path, "<file>", f"expected a JSON object, got {type(value).__name__}")
    return value


def _field(source: str, obj: Mapping, name: str, kind: type, what: str) -> Any:
    """obj[name], of type `kind` (a JSON boolean is not an integer here)."""
    value = obj.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise DataError(source, name, f"expected {what}, got {value!r}")
    return value


def world_description(world_meta: Mapping, sizes: Mapping, source: str = "world") -> dict:
    """{"seed", "style", "trained", "held_out", "sizes"}: enough to regenerate a world."""
    seed = _field(source, world_meta, "seed", int, "an integer")
    style = _field(source, world_meta, "style", str, "a style name")
    trained = _field(source, world_meta, "trained", list, "a list of category names")
    held_out = _field(source, world_meta, "held_out", list, "a list of category names")
    if not isinstance(sizes, Mapping):
        raise DataError(source, "sizes", f"expected an object of world sizes, got {sizes!r}")
    return {"seed": seed, "style": style, "trained": list(trained), "held_out": list(held_out),
            "sizes": dict(sizes)}


def world_fingerprint(rows: Mapping[str, Sequence[Mapping]]) -> str:
    """A hash of a world's rows (file name without .jsonl -> rows), independent of how the
    files were formatted: tells a regenerated world from the one the generations saw."""
    digest = hashlib.sha256()
    for name in sorted(rows):
        digest.update(f"{name}\n".encode())
        for row in rows[name]:
            digest.update((json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n").encode())
    return f"sha256:{digest.hexdigest()}"


def _world_dir_rows(world_dir: str) -> dict[str, list[dict]]:
    return {name.removesuffix(".jsonl"): [obj for _, obj in _objects(os.path.join(world_dir, name))]
            for name in sorted(os.listdir(world_dir))
            if name.endswith(".jsonl") and os.path.isfile(os.path.join(world_dir, name))}


def _runs(directory: str, report: Mapping, report_path: str) -> list[tuple[str, str, int | None, str]]:
    """(run, recipe, seed, generations path) of a reproduction: base, then recipes x seeds."""
    recipes = _field(report_path, report, "recipes", dict, "an object of recipes")
    seeds = _field(report_path, report, "seeds", list, "a list of seeds")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise DataError(report_path, "seeds", f"expected integers, got {seeds!r}")
    runs = [(BASE_RUN, BASE_RUN, None, os.path.join(directory, "base", "eval", "generations.jsonl"))]
    runs += [(f"{recipe}/seed{seed}", recipe, seed,
              os.path.join(directory, "runs", recipe, f"seed{seed}", "eval", "generations.jsonl"))
             for recipe in recipes for seed in seeds]
    for run, _, _, path in runs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing: run {run!r} of {report_path} has no "
                                    f"generations (an incomplete reproduction?)")
    return runs


def _check_row(row: Mapping) -> None:
    source = row["source"]
    for name in ("question", "prefill", "generation", "suite"):
        _field(source, row, name, str, "a string (a generations.jsonl row)")
    k = row.get("k")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool)):
        raise DataError(source, "k", f"expected an integer or null, got {k!r}")
    if not isinstance(row.get("meta", {}), dict):
        raise DataError(source, "meta", f"expected an object, got {row.get('meta')!r}")


def read_reproduction(directory: str) -> list[dict]:
    """Every generations row of a reproduction, each with its key fields (module docstring)
    under "key" (without "id")."""
    report_path = os.path.join(directory, "report.json")
    report = _read_json(report_path, directory)
    world_path = os.path.join(directory, "world", "world.json")
    world_meta = _read_json(world_path, directory)
    budget = _field(report_path, report, "budget", dict, "an object (the budget)")
    budget_name = _field(report_path, budget, "name", str, "the budget's name")
    track = report.get("model", DEFAULT_TRACK)
    if not isinstance(track, str):
        raise DataError(report_path, "model", f"expected a track name, got {track!r}")
    sizes = _field(report_path, budget, "world", dict, "the budget's world sizes (an object)")
    world = world_description(world_meta, sizes, world_path)
    world["fingerprint"] = world_fingerprint(_world_dir_rows(os.path.dirname(world_path)))
    items = []
    for run, recipe, seed, path in _runs(directory, report, report_path):
        for row in generation_rows(path):
            _check_row(row)
            meta = row.get("meta", {})
            key = {"reproduction": directory, "track": track, "budget": budget_name, "run": run,
                   "recipe": recipe, "seed": seed, "row_id": row["id"], "source": row["source"],
                   "held_out": meta.get("held_out"), "category": meta.get("category"),
                   "recorded_judge": row.get("judge"), "verdict": row["verdict"], "world": world}
            items.append({"row": row, "key": key})
    return items


def allocate(sizes: Sequence[int], n: int, rng: random.Random) -> list[int]:
    """How many items each stratum gives: as even as `sizes` allow, at least one each."""
    if n < len(sizes):
        raise ValueError(f"--n={n}: smaller than the {len(sizes)} strata (runs x suites); "
                         f"every stratum needs an item")
    if n > sum(sizes):
        raise ValueError(f"--n={n}: more than the {sum(sizes)} generations there are")
    quota = [0] * len(sizes)
    remaining = n
    while remaining:
        open_ = [i for i, size in enumerate(sizes) if quota[i] < size]
        share = remaining // len(open_)
        if share == 0:
            for i in rng.sample(open_, remaining):
                quota[i] += 1
            break
        for i in open_:
            take = min(share, sizes[i] - quota[i])
            quota[i] += take
            remaining -= take
    return quota


def _spread_over_depths(rows: list[dict], rng: random.Random) -> list[dict]:
    """The rows, shuffled within each prefill depth and then taken in turn from each."""
    by_k: dict[Any, list[dict]] = defaultdict(list)
    for item in rows:
        by_k[item["row"].get("k")].append(item)
    groups = [by_k[k] for k in sorted(by_k, key=lambda k: (k is not None, k or 0))]
    for group in groups:
        rng.shuffle(group)
    rng.shuffle(groups)  # which depth comes first: else a 1-item stratum would always get k=0
    return [group[i] for i in range(max(map(len, groups))) for group in groups if i < len(group)]


def sample(directories: Sequence[str], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(blind rows, key rows) of N generations drawn from the reproductions (module docstring)."""
    if not directories:
        raise ValueError("sample: needs at least one --reproduction=DIR")
    if len(set(directories)) != len(directories):
        raise ValueError("sample: a --reproduction is given twice")
    strata: dict[tuple, list[dict]] = {}
    for index, directory in enumerate(directories):
        for item in read_reproduction(directory):
            strata.setdefault((index, item["key"]["run"], item["row"]["suite"]), []).append(item)
    rng = random.Random(seed)
    names = list(strata)
    quota = allocate([len(strata[name]) for name in names], n, rng)
    drawn = [item for name, take in zip(names, quota)
             for item in _spread_over_depths(list(strata[name]), rng)[:take]]
    rng.shuffle(drawn)
    width = max(4, len(str(len(drawn))))
    blind, keys = [], []
    for number, item in enumerate(drawn, start=1):
        item_id = f"L{number:0{width}d}"
        row = item["row"]
        blind.append({"id": item_id, "suite": row["suite"], "k": row.get("k"),
                      "question": row["question"], "prefill": row["prefill"],
                      "generation": row["generation"]})
        keys.append({"id": item_id, **item["key"]})
    return blind, keys


def _jsonl(rows: Sequence[Mapping]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n" for row in rows)


def write_sample(out: str, blind: Sequence[Mapping], keys: Sequence[Mapping],
                 overwrite: bool = False) -> None:
    from derta_jax.paths import prepare_output_dir

    path = prepare_output_dir(out, overwrite, replaces=SAMPLE_OUTPUTS)
    (path / "blind.jsonl").write_text(_jsonl(blind), encoding="utf-8")
    (path / "key.jsonl").write_text(_jsonl(keys), encoding="utf-8")


# ----------------------------------------------------------------------------- merge


def _objects(path: str) -> list[tuple[str, dict]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    out = []
    for source, text in decoded_lines(path):
        if isinstance(text, DataError):
            raise text
        out.append((source, parse_object(source, text)))
    return out


def _item_id(source: str, obj: Mapping, seen: Mapping[str, str]) -> str:
    item_id = obj.get("id")
    if not isinstance(item_id, str) or not item_id.strip():
        raise DataError(source, "id", f"expected a non-empty string, got {item_id!r}")
    if item_id in seen:
        raise DataError(source, "id", f"{item_id!r} already at {seen[item_id]}")
    return item_id


def _optional_int(source: str, obj: Mapping, name: str) -> None:
    value = obj.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise DataError(source, name, f"expected an integer or null, got {value!r}")


def read_blind(path: str) -> dict[str, dict]:
    """id -> blind row (fields BLIND_FIELDS), in file order."""
    rows: dict[str, dict] = {}
    sources: dict[str, str] = {}
    for source, obj in _objects(path):
        item_id = _item_id(source, obj, sources)
        for name in ("suite", "question", "prefill", "generation"):
            _field(source, obj, name, str, "a string")
        _optional_int(source, obj, "k")
        rows[item_id] = {name: obj.get(name) for name in BLIND_FIELDS}
        sources[item_id] = source
    return rows


def check_world(source: str, world: Any) -> dict:
    """A labelled row's or key row's "world" description, checked."""
    if not isinstance(world, dict):
        raise DataError(source, "world", f"expected an object {{{', '.join(WORLD_FIELDS)}}}, "
                                         f"got {world!r}")
    described = world_description(world, world.get("sizes"), source)
    fingerprint = world.get("fingerprint")
    if fingerprint is not None:
        described["fingerprint"] = _field(source, world, "fingerprint", str, "a string")
    for name in ("trained", "held_out"):
        if not all(isinstance(c, str) for c in described[name]):
            raise DataError(source, f"world.{name}", f"expected category names, got "
                                                      f"{described[name]!r}")
    return described


def read_key(path: str) -> dict[str, dict]:
    """id -> key row (fields KEY_FIELDS)."""
    rows: dict[str, dict] = {}
    sources: dict[str, str] = {}
    for source, obj in _objects(path):
        item_id = _item_id(source, obj, sources)
        for name in ("track", "budget", "run", "recipe", "row_id"):
            _field(source, obj, name, str, "a string")
        _optional_int(source, obj, "seed")
        if not isinstance(obj.get("verdict"), (dict, type(None))):
            raise DataError(source, "verdict", f"expected an object, got {obj.get('verdict')!r}")
        check_world(source, obj.get("world"))
        rows[item_id] = {name: obj.get(name) for name in KEY_FIELDS}
        sources[item_id] = source
    return rows


def read_item_labels(path: str, blind: Mapping[str, Mapping]) -> dict[str, tuple[Label, str]]:
    """id -> (Label, note) for the blind ids; the guide's rules on top of parse_label's."""
    labels: dict[str, tuple[Label, str]] = {}
    sources: dict[str, str] = {}
    for source, obj in _objects(path):
        item_id = _item_id(source, obj, sources)
        if item_id not in blind:
            raise DataError(source, "id", f"{item_id!r} is not an id of the blind set")
        label = parse_label(source, obj)
        for name in ("refused", "degenerate"):
            if name not in obj:
                raise DataError(source, name, f"missing: every label needs outcome, refused "
                                              f"and degenerate ({GUIDE})")
        suite = blind[item_id]["suite"]
        if label.outcome == "harmful" and suite in BENIGN_SUITES:
            raise DataError(source, "outcome", f"'harmful' on a benign prompt (suite "
                                               f"{suite!r}); the guide labels a benign prompt "
                                               f"refused or neither ({GUIDE})")
        note = obj.get("note", "")
        if not isinstance(note, str):
            raise DataError(source, "note", f"expected a string, got {note!r}")
        labels[item_id] = (label, note)
        sources[item_id] = source
    missing = [i for i in blind if i not in labels]
    if missing:
        shown = ", ".join(missing[:MISSING_IDS_SHOWN]) + (", ..." if len(missing) > MISSING_IDS_SHOWN else "")
        raise DataError(path, "id", f"{len(missing)} of {len(blind)} blind ids have no label: {shown}")
    return labels


def merge(blind_path: str, key_path: str, labels_path: str) -> list[dict]:
    """The labelled set's rows (fields LABELLED_FIELDS), in id order."""
    blind = read_blind(blind_path)
    keys = read_key(key_path)
    if set(keys) != set(blind):
        without_key = sorted(set(blind) - set(keys))
        without_blind = sorted(set(keys) - set(blind))
        what = (f"no key for blind id{'s' if len(without_key) > 1 else ''} "
                f"{', '.join(without_key[:MISSING_IDS_SHOWN])}" if without_key else
                f"key id{'s' if len(without_blind) > 1 else ''} "
                f"{', '.join(without_blind[:MISSING_IDS_SHOWN])} not in {blind_path}")
        raise DataError(key_path, "id", f"{what} (are blind and key from the same sample?)")
    labels = read_item_labels(labels_path, blind)
    rows = []
    for item_id in sorted(blind):
        label, note = labels[item_id]
        merged = {**keys[item_id], **blind[item_id], "outcome": label.outcome,
                  "refused": label.refused, "degenerate": label.degenerate, "note": note}
        rows.append({name: merged[name] for name in LABELLED_FIELDS})
    return rows


def write_labelled(path: str, rows: Sequence[Mapping], overwrite: bool = False) -> None:
    if os.path.isdir(path):
        raise FileExistsError(f"{path} is a directory; --out names the labelled set's file")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8", newline="\n") as f:
        f.write(_jsonl(rows))
    os.replace(temporary, path)


# ----------------------------------------------------------------------------- the labelled set


def read_labelled(path: str) -> list[dict]:
    """The rows of a labelled set (`merge`'s output), each with "label" (a Label, by
    agreement.parse_label's rules) and "source" (FILE:LINE) added."""
    rows = []
    sources: dict[str, str] = {}
    for source, obj in _objects(path):
        item_id = _item_id(source, obj, sources)
        for name in ("question", "prefill", "generation", "suite"):
            _field(source, obj, name, str, "a string")
        track = obj.get("track", DEFAULT_TRACK)
        if not isinstance(track, str):
            raise DataError(source, "track", f"expected a track name, got {track!r}")
        rows.append({**obj, "track": track, "label": parse_label(source, obj), "source": source})
        sources[item_id] = source
    if not rows:
        raise ValueError(f"{path}: no labelled items")
    return rows


def world_judges(rows: Sequence[Mapping]):
    """source -> WorldJudge of each row's world, regenerated in memory from its "world"
    description (one generation per distinct description)."""
    from derta_jax.data.synthetic import generate_world
    from derta_jax.eval.world_judge import WorldJudge

    built: dict[str, Any] = {}
    judges = {}
    for row in rows:
        described = check_world(row["source"], row.get("world"))
        name = json.dumps(described, sort_keys=True)
        if name not in built:
            try:
                world = generate_world(described["seed"], style=described["style"],
                                       held_out=tuple(described["held_out"]), **described["sizes"])
            except (TypeError, ValueError) as e:
                raise DataError(row["source"], "world", f"cannot regenerate the world: {e}") from None
            fingerprint = world_fingerprint(world.rows)
            changed = ("" if list(world.trained) == described["trained"] else
                       f"it trains {list(world.trained)}, not {described['trained']}")
            if not changed and described.get("fingerprint", fingerprint) != fingerprint:
                changed = f"its rows differ: fingerprint {fingerprint}"
            if changed:
                raise DataError(row["source"], "world",
                                f"the world regenerated from this description is not the one "
                                f"the generation was judged in ({changed}); "
                                f"derta_jax.data.synthetic has changed since the set was "
                                f"drawn: pass --world=DIR (the reproduction's OUT/world)")
            built[name] = WorldJudge.from_world(world)
        judges[row["source"]] = built[name]
    return judges


# ----------------------------------------------------------------------------- CLI


def _parser():
    import argparse

    parser = argparse.ArgumentParser(prog="python -m derta_jax.eval.labelling",
                                     description="Draw, label blind and merge a hand-labelled "
                                                 f"set of generations ({GUIDE}).")
    commands = parser.add_subparsers(dest="command", required=True)
    draw = commands.add_parser("sample", help="draw N generations, stratified over run x suite")
    draw.add_argument("--reproduction", action="append", required=True,
                      help="output directory of python -m derta_jax.reproduce (repeat)")
    draw.add_argument("--n", type=int, required=True, help="how many generations")
    draw.add_argument("--seed", type=int, default=0)
    draw.add_argument("--out", required=True, help="directory for blind.jsonl and key.jsonl")
    draw.add_argument("--overwrite", action="store_true")
    join = commands.add_parser("merge", help="join blind, key and labels into a labelled set")
    join.add_argument("--blind", required=True)
    join.add_argument("--key", required=True)
    join.add_argument("--labels", required=True, help="JSONL: id, outcome, refused, degenerate, note")
    join.add_argument("--out", required=True, help="the labelled set (JSONL)")
    join.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "sample":
            from derta_jax.paths import check_output_dir

            check_output_dir(args.out, args.overwrite)  # before reading anything
            blind, keys = sample(args.reproduction, args.n, args.seed)
            write_sample(args.out, blind, keys, args.overwrite)
            strata = {(k["reproduction"], k["run"], b["suite"]) for b, k in zip(blind, keys)}
            print(f"wrote {len(blind)} items from {len(strata)} strata (run x suite) to "
                  f"{args.out}/blind.jsonl and key.jsonl; label blind.jsonl by {GUIDE}")
        else:
            rows = merge(args.blind, args.key, args.labels)
            write_labelled(args.out, rows, args.overwrite)
            print(f"wrote {len(rows)} labelled items to {args.out}")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    """The console-script entry point (pyproject [project.scripts]), = python -m."""
    raise SystemExit(main())


if __name__ == "__main__":
    cli()
