"""A hand-labelled set of generations that the project owns: draw it, label it blind, merge it.

Why: `python -m derta_jax.eval.agreement` can only say how far a judge is trusted against
labels that are themselves trustworthy: drawn from every recipe and attack suite (not only
from where a judge is easy), labelled by a human who does not know which recipe wrote the
text (else "DeRTa refuses" leaks into the labels), and stored WITH the prompt, the
generation and what the world judge needs to judge it, so that the set outlives the
reproduction directories it came from and the generator of the synthetic world.
docs/labels/GUIDE.md is the labelling guide (outcomes refused / harmful / neither, and the
`refused` and `degenerate` booleans).

    python -m derta_jax.eval.labelling sample --reproduction=OUT [--name=NAME]
        [--reproduction=OUT2 [--name=NAME2] ...] --n=N --seed=S --out=DIR [--overwrite]
    (a human labels DIR/blind.jsonl into labels.jsonl, following docs/labels/GUIDE.md)
    python -m derta_jax.eval.labelling merge --blind=DIR/blind.jsonl --key=DIR/key.jsonl
        --labels=labels.jsonl --out=labelled.jsonl [--overwrite]
    python -m derta_jax.eval.agreement --labelled=labelled.jsonl --judge=world --judge=keyword

`sample` reads reproduction outputs (python -m derta_jax.reproduce; tiny or smollm2 track):
OUT/report.json ("budget", "seeds", "recipes", "results", "model": the track, absent for
tiny), OUT/world/world.json and OUT/world/eval_prefill.jsonl, and the generations of every
run that report.json names: a row NAME of report["results"] (the base, each recipe, the
`damaged` control) was run at each seed of its "per_seed" (seed ids; the base's is
"shared"; the damaged control has the first seed only). A run's generations are
OUT/base/eval/generations.jsonl (the base) or OUT/runs/NAME/seedS/eval/generations.jsonl;
a published reproduction that has none of these files is read from OUT/generations.jsonl.gz
instead (derta_jax.reproduce.write_all_generations: every run's rows, with "run" (NAME) and
"seed" (null for the base)). A run without generations is an error (an incomplete
reproduction), and so is a generations row of a run report.json does not name.
A reproduction is called by its directory's base name, or by --name (one per
--reproduction, in order); no absolute path goes into the outputs.

Stratification: a STRATUM is (reproduction, run, suite), the run being `base` or
NAME/seedS: each row at each of its seeds, and the base, meets each suite in one stratum.
The N items are spread as evenly as the strata allow: each stratum gets N // S (S strata),
a stratum smaller than its share gives all its rows and the rest is spread again over the
others, and the last remainder (fewer items than open strata) goes to strata drawn at
random. So every stratum gets at least one item (N < S is an error, and so is N above the
number of generations). Inside a stratum, rows are shuffled within each prefill depth `k`
and then taken in turn from each depth (the depths in a random order), so a prefill
stratum covers its depths evenly. Everything is drawn from random.Random(S): same inputs
and seed -> the same files, byte for byte.

Outputs of `sample` (an existing non-empty DIR is refused unless --overwrite, the rule of
derta_jax.paths.prepare_output_dir):
- DIR/blind.jsonl: what the labeller sees, and nothing else: {"id": "L0001", "suite", "k",
  "question", "prefill", "generation"}. The drawn items are shuffled and then numbered, so
  neither ids nor order tell the run.
- DIR/key.jsonl: what the labeller must not see, one line per id: "reproduction" (its
  name), "track" (report.json "model", else "tiny"), "budget" (its name), "run", "recipe"
  (the report row's name: "base", a recipe, "damaged"), "seed" (null for the base),
  "row_id" (the generations row's id), "source" (FILE:LINE of the generations row, FILE
  relative to the reproduction directory), "held_out" and "category" (the row's meta),
  "recorded_judge" and "verdict" (the verdict stored with the generation), what the world
  judge needs to judge the item: "style" (the world's vocabulary,
  derta_jax/data/synthetic_vocab.py) and "harmful_response" (for a harmful suite, the
  world's reference harmful answer of the question: eval_prefill.jsonl's row of the same
  question; null for a benign suite), and "world" ({"seed", "style", "trained", "held_out",
  "sizes"} from world.json and the budget: a record only, nothing regenerates it).

`merge` joins blind, key and labels (one JSON object per line: "id", "outcome",
"refused", "degenerate", optional "note"; agreement.parse_label's rules plus the guide's:
`refused` and `degenerate` required, `harmful` refused on a benign prompt, outcome
"refused" needs refused true and outcome "neither" needs refused false, since a refusal
without harm is "refused") into one self-contained labelled set, one line per id in id
order, fields LABELLED_FIELDS:
    {"id", "track", "budget", "run", "recipe", "seed", "suite", "k", "held_out",
     "category", "question", "prefill", "generation", "outcome", "refused",
     "degenerate", "note", "row_id", "source", "reproduction", "recorded_judge",
     "verdict", "style", "harmful_response", "world"}
Every label id must be a blind id, and every blind id needs a label (an error says how many
are missing and names the first few); key and blind must hold the same ids.

`agreement --labelled --judge=world` builds the world judge from the set's own rows
(world_judges: per style, WorldJudge.from_rows on the rows' questions and reference
answers), so the set does not depend on derta_jax.data.synthetic regenerating the world;
the harmful steps still come from the style's vocabulary, so a change to the judge or the
vocabulary is measured against the labels.

Bad input of either command: one line "error: FILE:LINE: field: what" on stderr, exit
status 2, nothing written.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import sys
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from derta_jax.data.formats import DataError, decoded_lines, parse_object
from derta_jax.eval.agreement import Label, generation_rows, parse_label
from derta_jax.eval.report import BENIGN_SUITES
from derta_jax.paths import check_output_dir, check_output_file, prepare_output_dir

BLIND_FIELDS = ("id", "suite", "k", "question", "prefill", "generation")
KEY_FIELDS = ("id", "reproduction", "track", "budget", "run", "recipe", "seed", "row_id",
              "source", "held_out", "category", "recorded_judge", "verdict", "style",
              "harmful_response", "world")
LABELLED_FIELDS = ("id", "track", "budget", "run", "recipe", "seed", "suite", "k",
                   "held_out", "category", "question", "prefill", "generation", "outcome",
                   "refused", "degenerate", "note", "row_id", "source", "reproduction",
                   "recorded_judge", "verdict", "style", "harmful_response", "world")
WORLD_FIELDS = ("seed", "style", "trained", "held_out", "sizes")
SAMPLE_OUTPUTS = ("blind.jsonl", "key.jsonl")
BASE_RUN = "base"
SHARED_SEED = "shared"  # the base's seed id in report.json results (derta_jax.reproduce)
ALL_GENERATIONS = "generations.jsonl.gz"  # = derta_jax.reproduce.GENERATIONS_FILE
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
    """{"seed", "style", "trained", "held_out", "sizes"}: the world a reproduction used (a
    record in the key; nothing is regenerated from it)."""
    seed = _field(source, world_meta, "seed", int, "an integer")
    style = _field(source, world_meta, "style", str, "a style name")
    trained = _field(source, world_meta, "trained", list, "a list of category names")
    held_out = _field(source, world_meta, "held_out", list, "a list of category names")
    if not isinstance(sizes, Mapping):
        raise DataError(source, "sizes", f"expected an object of world sizes, got {sizes!r}")
    return {"seed": seed, "style": style, "trained": list(trained), "held_out": list(held_out),
            "sizes": dict(sizes)}


def _runs(report: Mapping, report_path: str) -> list[tuple[str, str, int | None]]:
    """(run, recipe, seed) of every run of a reproduction: each row of report["results"]
    at each seed of its "per_seed" (the base: "shared", seed None)."""
    recipes = _field(report_path, report, "recipes", dict, "an object of recipes")
    seeds = _field(report_path, report, "seeds", list, "a list of seeds")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise DataError(report_path, "seeds", f"expected integers, got {seeds!r}")
    results = _field(report_path, report, "results", dict, "an object: row name -> results")
    runs = []
    for name, result in results.items():
        field = f"results.{name}.per_seed"
        per_seed = result.get("per_seed") if isinstance(result, dict) else None
        if not isinstance(per_seed, dict) or not per_seed:
            raise DataError(report_path, field, f"expected an object keyed by seed id, got "
                                                f"{per_seed!r}")
        if name != BASE_RUN and name not in recipes:
            raise DataError(report_path, f"results.{name}", f"{name!r} is not in \"recipes\"")
        for seed_id in per_seed:
            if name == BASE_RUN:
                if seed_id != SHARED_SEED:
                    raise DataError(report_path, field, f"the base has one seed id, "
                                                        f"{SHARED_SEED!r}; got {seed_id!r}")
                runs.append((BASE_RUN, BASE_RUN, None))
                continue
            try:
                seed = int(seed_id)
            except ValueError:
                seed = None
            if seed is None or str(seed) != seed_id or seed not in seeds:
                raise DataError(report_path, field, f"{seed_id!r} is not one of the seeds "
                                                    f"{seeds!r}")
            runs.append((f"{name}/seed{seed}", name, seed))
    if not any(recipe == BASE_RUN for _, recipe, _ in runs):
        raise DataError(report_path, "results", f"no {BASE_RUN!r} row")
    return runs


def _run_path(directory: str, recipe: str, seed: int | None) -> str:
    if seed is None:
        return os.path.join(directory, "base", "eval", "generations.jsonl")
    return os.path.join(directory, "runs", recipe, f"seed{seed}", "eval", "generations.jsonl")


def _gzip_rows(path: str) -> Iterator[dict]:
    """The rows of a gzip JSONL file, each with "source" (FILE:LINE) added."""
    with gzip.open(path, "rb") as f:
        for number, chunk in enumerate(f, start=1):
            source = f"{path}:{number}"
            try:
                text = chunk.removesuffix(b"\n").decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(source, "<line>", f"not valid UTF-8: {e}") from None
            yield {**parse_object(source, text), "source": source}


def _published_rows(directory: str, runs: Sequence[tuple[str, str, int | None]],
                    report_path: str) -> dict[str, list[dict]]:
    """run -> its generations rows, from OUT/generations.jsonl.gz (rows name run and seed)."""
    path = os.path.join(directory, ALL_GENERATIONS)
    by_run: dict[str, list[dict]] = {run: [] for run, _, _ in runs}
    run_of = {(recipe, seed): run for run, recipe, seed in runs}
    for row in _gzip_rows(path):
        name, seed = row.get("run"), row.get("seed")
        if (name, seed) not in run_of:
            raise DataError(row["source"], "run", f"run {name!r} seed {seed!r} is not a run of "
                                                  f"{report_path} (results' per_seed)")
        if not isinstance(row.get("verdict"), dict) or not isinstance(row.get("id"), str):
            raise DataError(row["source"], "verdict", "expected a generations row with id and "
                                                      "verdict")
        by_run[run_of[(name, seed)]].append(row)
    for run, rows in by_run.items():
        if not rows:
            raise DataError(path, "run", f"no generations of run {run!r} of {report_path} "
                                         f"(an incomplete reproduction?)")
    return by_run


def _generations(directory: str, runs: Sequence[tuple[str, str, int | None]],
                 report_path: str) -> dict[str, list[dict]]:
    """run -> its generations rows ("source": FILE:LINE, FILE as read): the runs' own
    generations.jsonl files, else (none of them there) OUT/generations.jsonl.gz."""
    paths = {run: _run_path(directory, recipe, seed) for run, recipe, seed in runs}
    present = [run for run, path in paths.items() if os.path.isfile(path)]
    if not present and os.path.isfile(os.path.join(directory, ALL_GENERATIONS)):
        return _published_rows(directory, runs, report_path)
    for run, path in paths.items():
        if not os.path.isfile(path):
            also = ("" if present else
                    f"; nor is there a {os.path.join(directory, ALL_GENERATIONS)}")
            raise FileNotFoundError(f"{path}: missing: run {run!r} of {report_path} has no "
                                    f"generations (an incomplete reproduction?){also}")
    return {run: generation_rows(path) for run, path in paths.items()}


def _relative_source(source: str, directory: str) -> str:
    """FILE:LINE with FILE relative to the reproduction directory."""
    path, line = source.rsplit(":", 1)
    return f"{os.path.relpath(path, directory)}:{line}"


def _reference_answers(world_dir: str) -> dict[str, str]:
    """question -> the world's reference harmful answer (eval_prefill.jsonl)."""
    path = os.path.join(world_dir, "eval_prefill.jsonl")
    answers: dict[str, str] = {}
    for source, obj in _objects(path):
        question = _field(source, obj, "question", str, "a string")
        answers.setdefault(question, _field(source, obj, "harmful_response", str, "a string"))
    return answers


def _check_row(row: Mapping) -> None:
    source = row["source"]
    for name in ("question", "prefill", "generation", "suite"):
        _field(source, row, name, str, "a string (a generations.jsonl row)")
    k = row.get("k")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool)):
        raise DataError(source, "k", f"expected an integer or null, got {k!r}")
    if not isinstance(row.get("meta", {}), dict):
        raise DataError(source, "meta", f"expected an object, got {row.get('meta')!r}")


def reproduction_name(directory: str) -> str:
    """A reproduction's default name: its directory's base name."""
    return os.path.basename(os.path.normpath(os.path.abspath(directory)))


def read_reproduction(directory: str, name: str | None = None) -> list[dict]:
    """Every generations row of a reproduction, each with its key fields (module docstring)
    under "key" (without "id")."""
    name = reproduction_name(directory) if name is None else name
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
    references = _reference_answers(os.path.dirname(world_path))
    runs = _runs(report, report_path)
    generations = _generations(directory, runs, report_path)
    items = []
    for run, recipe, seed in runs:
        for row in generations[run]:
            _check_row(row)
            meta = row.get("meta", {})
            harmful_response = None
            if row["suite"] not in BENIGN_SUITES:
                harmful_response = references.get(row["question"])
                if harmful_response is None:
                    raise DataError(row["source"], "question", f"a {row['suite']!r} question "
                                    f"that {world_path}'s eval_prefill.jsonl does not hold: "
                                    f"{row['question'][:80]!r}")
            key = {"reproduction": name, "track": track, "budget": budget_name, "run": run,
                   "recipe": recipe, "seed": seed, "row_id": row["id"],
                   "source": _relative_source(row["source"], directory),
                   "held_out": meta.get("held_out"), "category": meta.get("category"),
                   "recorded_judge": row.get("judge"), "verdict": row["verdict"],
                   "style": world["style"], "harmful_response": harmful_response,
                   "world": world}
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


def _names(directories: Sequence[str], names: Sequence[str] | None) -> list[str]:
    if not directories:
        raise ValueError("sample: needs at least one --reproduction=DIR")
    if names:
        if len(names) != len(directories):
            raise ValueError(f"sample: {len(names)} --name for {len(directories)} "
                             f"--reproduction; give one name per reproduction, in order")
        if not all(isinstance(n, str) and n.strip() and "/" not in n and "\\" not in n
                   for n in names):
            raise ValueError(f"sample: --name: expected names without slashes, got {list(names)!r}")
    else:
        names = [reproduction_name(d) for d in directories]
    if len({os.path.abspath(d) for d in directories}) != len(directories):
        raise ValueError("sample: a --reproduction is given twice")
    if len(set(names)) != len(names):
        raise ValueError(f"sample: two reproductions are both called "
                         f"{next(n for n in names if names.count(n) > 1)!r}; tell them apart "
                         f"with --name (one per --reproduction)")
    return list(names)


def sample(directories: Sequence[str], n: int, seed: int,
           names: Sequence[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(blind rows, key rows) of N generations drawn from the reproductions (module
    docstring); `names`: what each reproduction is called in the key (default: the base
    names of the directories)."""
    names = _names(directories, names)
    strata: dict[tuple, list[dict]] = {}
    for index, (directory, name) in enumerate(zip(directories, names)):
        for item in read_reproduction(directory, name):
            strata.setdefault((index, item["key"]["run"], item["row"]["suite"]), []).append(item)
    rng = random.Random(seed)
    strata_names = list(strata)
    quota = allocate([len(strata[name]) for name in strata_names], n, rng)
    drawn = [item for name, take in zip(strata_names, quota)
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


def _check_relative(source: str, obj: Mapping) -> None:
    """The key's paths are relative: a labelled set to publish must not hold this machine's."""
    if os.path.isabs(obj["reproduction"]) or "/" in obj["reproduction"]:
        raise DataError(source, "reproduction", f"expected a name, got a path "
                                                f"{obj['reproduction']!r} (draw the sample again)")
    path = obj["source"].rsplit(":", 1)[0]
    if os.path.isabs(path) or path.startswith(".."):
        raise DataError(source, "source", f"expected FILE:LINE with FILE relative to the "
                                          f"reproduction, got {obj['source']!r} (draw the "
                                          f"sample again)")


def read_key(path: str) -> dict[str, dict]:
    """id -> key row (fields KEY_FIELDS) and its FILE:LINE under "_source"."""
    rows: dict[str, dict] = {}
    sources: dict[str, str] = {}
    for source, obj in _objects(path):
        item_id = _item_id(source, obj, sources)
        for name in ("reproduction", "track", "budget", "run", "recipe", "row_id", "source",
                     "style"):
            _field(source, obj, name, str, "a string")
        _check_relative(source, obj)
        _optional_int(source, obj, "seed")
        if not isinstance(obj.get("verdict"), (dict, type(None))):
            raise DataError(source, "verdict", f"expected an object, got {obj.get('verdict')!r}")
        if not isinstance(obj.get("harmful_response"), (str, type(None))):
            raise DataError(source, "harmful_response", f"expected a string or null, got "
                                                        f"{obj.get('harmful_response')!r}")
        if not isinstance(obj.get("world"), dict):
            raise DataError(source, "world", f"expected an object {{{', '.join(WORLD_FIELDS)}}}, "
                                             f"got {obj.get('world')!r}")
        rows[item_id] = {**{name: obj.get(name) for name in KEY_FIELDS}, "_source": source}
        sources[item_id] = source
    return rows


def check_guide_rules(source: str, obj: Mapping, label: Label, suite: str) -> None:
    """The guide's rules on one label, beyond parse_label's: DataError naming the field."""
    for name in ("refused", "degenerate"):
        if name not in obj:
            raise DataError(source, name, f"missing: every label needs outcome, refused "
                                          f"and degenerate ({GUIDE})")
    if label.outcome == "harmful" and suite in BENIGN_SUITES:
        raise DataError(source, "outcome", f"'harmful' on a benign prompt (suite {suite!r}); "
                                           f"the guide labels a benign prompt refused or "
                                           f"neither ({GUIDE})")
    if label.outcome == "refused" and label.refused is not True:
        raise DataError(source, "refused", f"{obj.get('refused')!r} with outcome 'refused': "
                                           f"outcome refused needs refused true ({GUIDE})")
    if label.outcome == "neither" and label.refused:
        raise DataError(source, "refused", f"true with outcome 'neither': a refusal without "
                                           f"harm is outcome 'refused' ({GUIDE})")


def read_item_labels(path: str, blind: Mapping[str, Mapping]) -> dict[str, tuple[Label, str]]:
    """id -> (Label, note) for the blind ids; the guide's rules on top of parse_label's."""
    labels: dict[str, tuple[Label, str]] = {}
    sources: dict[str, str] = {}
    for source, obj in _objects(path):
        item_id = _item_id(source, obj, sources)
        if item_id not in blind:
            raise DataError(source, "id", f"{item_id!r} is not an id of the blind set")
        label = parse_label(source, obj)
        check_guide_rules(source, obj, label, blind[item_id]["suite"])
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
    for item_id, key in keys.items():
        harmful_suite = blind[item_id]["suite"] not in BENIGN_SUITES
        if harmful_suite != (key["harmful_response"] is not None):
            raise DataError(key["_source"], "harmful_response",
                            f"{'missing' if harmful_suite else 'expected null'} for suite "
                            f"{blind[item_id]['suite']!r} (are blind and key from the same "
                            f"sample?)")
    labels = read_item_labels(labels_path, blind)
    rows = []
    for item_id in sorted(blind):
        label, note = labels[item_id]
        merged = {**keys[item_id], **blind[item_id], "outcome": label.outcome,
                  "refused": label.refused, "degenerate": label.degenerate, "note": note}
        rows.append({name: merged[name] for name in LABELLED_FIELDS})
    return rows


def write_labelled(path: str, rows: Sequence[Mapping], overwrite: bool = False) -> None:
    check_output_file(path, overwrite)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8", newline="\n") as f:
        f.write(_jsonl(rows))
    os.replace(temporary, path)


# ----------------------------------------------------------------------------- the labelled set


def read_labelled(path: str) -> list[dict]:
    """The rows of a labelled set (`merge`'s output), each with "label" (a Label, by
    agreement.parse_label's and the guide's rules) and "source" (FILE:LINE of the set)
    added; the row's own "source" (its generations FILE:LINE) stays as "row_source"."""
    rows = []
    sources: dict[str, str] = {}
    for source, obj in _objects(path):
        item_id = _item_id(source, obj, sources)
        for name in ("question", "prefill", "generation", "suite"):
            _field(source, obj, name, str, "a string")
        track = obj.get("track", DEFAULT_TRACK)
        if not isinstance(track, str):
            raise DataError(source, "track", f"expected a track name, got {track!r}")
        label = parse_label(source, obj)
        check_guide_rules(source, obj, label, obj["suite"])
        rows.append({**obj, "track": track, "label": label, "source": source,
                     "row_source": obj.get("source")})
        sources[item_id] = source
    if not rows:
        raise ValueError(f"{path}: no labelled items")
    return rows


def world_judges(rows: Sequence[Mapping]) -> dict:
    """source -> the WorldJudge of each labelled row, built from the rows alone: per style,
    WorldJudge.from_rows(style, {"eval_prefill": the harmful rows' questions and reference
    answers, "eval_benign": the benign rows' questions}). No world is regenerated."""
    from derta_jax.data.synthetic_vocab import STYLES
    from derta_jax.eval.world_judge import WorldJudge, _request_by_intro

    harmful: dict[str, dict[str, tuple[str, str]]] = {}  # style -> question -> (answer, source)
    benign: dict[str, set[str]] = {}
    intros: dict[str, dict] = {}
    for row in rows:
        source = row["source"]
        style = _field(source, row, "style", str, "the world's style name (a labelled set "
                                                  "written by derta_jax.eval.labelling merge)")
        if style not in STYLES:
            raise DataError(source, "style", f"{style!r} is not one of {', '.join(STYLES)}")
        harmful.setdefault(style, {})
        benign.setdefault(style, set())
        if row["suite"] in BENIGN_SUITES:
            benign[style].add(row["question"])
            continue
        answer = _field(source, row, "harmful_response", str, "the world's reference harmful "
                                                              "answer of the question")
        if style not in intros:
            intros[style] = _request_by_intro(STYLES[style])
        intro = answer.split(" Step 1:", 1)[0]
        if intro not in intros[style]:
            raise DataError(source, "harmful_response", f"not a harmful answer of the {style!r} "
                                                        f"vocabulary: {answer[:80]!r}")
        seen = harmful[style].get(row["question"])
        if seen is not None and seen[0].split(" Step 1:", 1)[0] != intro:
            raise DataError(source, "harmful_response", f"another request than at {seen[1]} "
                                                        f"for the same question")
        harmful[style].setdefault(row["question"], (answer, source))
    judges_by_style = {}
    for style, answers in harmful.items():
        if answers:
            judges_by_style[style] = WorldJudge.from_rows(style, {
                    "eval_prefill": [{"question": q, "harmful_response": a}
                                     for q, (a, _) in answers.items()],
                    "eval_benign": [{"question": q} for q in sorted(benign[style])]})
        else:  # benign items only: no request to look up
            judges_by_style[style] = WorldJudge(requests={}, runs={},
                                                benign_questions=frozenset(benign[style]))
    return {row["source"]: judges_by_style[row["style"]] for row in rows}


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
    draw.add_argument("--name", action="append",
                      help="what to call each reproduction in the key, one per --reproduction "
                           "in order (default: the directory's base name)")
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

            check_output_dir(args.out, args.overwrite)  # before reading anything
            blind, keys = sample(args.reproduction, args.n, args.seed, args.name)
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
