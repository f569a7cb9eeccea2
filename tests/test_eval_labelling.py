"""The hand-labelled set's tooling (derta_jax/eval/labelling.py) and agreement on it: small
fake reproduction directories (a tiny and a plain_english world, generations rows built
from the worlds' own rows, a `damaged` control on the first seed only, as
derta_jax/reproduce.py writes), so nothing trains and nothing outside tmp_path is read."""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter

import pytest

from derta_jax.data.synthetic import write_world
from derta_jax.eval.agreement import main as agreement_main
from derta_jax.eval.labelling import BLIND_FIELDS, LABELLED_FIELDS, main
from derta_jax.eval.world_judge import WorldJudge

SIZES = {"num_triples": 12, "num_helpful": 24, "num_pretrain": 160, "num_eval_harmful": 2,
         "num_eval_benign": 5, "num_over_refusal": 3}
LORA_SIZES = {"num_triples": 12, "num_helpful": 24, "num_pretrain": 40,
              "pretrain_harmful_fraction": 0.0, "num_eval_harmful": 1, "num_eval_benign": 5,
              "num_over_refusal": 3}
RECIPES = ("vanilla", "derta")
SEEDS = (0, 1)
DAMAGED = "damaged"  # the control row: the first seed only (derta_jax/reproduce.py)
RUNS = (("base",) + tuple(f"{r}/seed{s}" for r in RECIPES for s in SEEDS)
        + (f"{DAMAGED}/seed{SEEDS[0]}",))
RECIPE_SEEDS = {("base", None)} | {(r, s) for r in RECIPES for s in SEEDS} | {(DAMAGED, SEEDS[0])}
SUITES = ("direct", "prefill", "benign", "over_refusal")
BENIGN = ("benign", "over_refusal")
LOOP = "Find " * 12


def _first_step(answer: str) -> str:
    return answer.split("Step 1:", 1)[1].split("Step 2:", 1)[0].strip()


def _items(world, run_index: int) -> list[dict]:
    """One run's generations: (row fields, truth label) built from the world's rows; the
    kind of generation (a step, a refusal, a loop, an answer) rotates with the run."""
    refusal = world.rows["triples"][0]["safe_response"]
    items = []
    harmful = world.rows["eval_prefill"][:3]
    for i, row in enumerate(harmful[:2]):
        items.append(("direct", f"direct/{i + 1:05d}", None, row, ""))
    for i, row in enumerate(harmful[1:3]):
        for k in (0, 2):
            prefill = " ".join(row["harmful_response"].split()[:k])
            items.append(("prefill", f"prefill/{i + 1:05d}/k{k}", k, row, prefill))
    for i, row in enumerate(world.rows["eval_benign"][:2]):
        items.append(("benign", f"benign/{i + 1:05d}", None, row, ""))
    for i, row in enumerate(world.rows["eval_over_refusal"][:2]):
        items.append(("over_refusal", f"over_refusal/{i + 1:05d}", None, row, ""))
    out = []
    for n, (suite, item_id, k, row, prefill) in enumerate(items):
        kind = (n + run_index) % 3
        if suite in BENIGN:
            text, truth = ((row["answer"], ("neither", False, False)) if kind else
                           (refusal, ("refused", True, False)))
        else:
            text, truth = [(_first_step(row["harmful_response"]), ("harmful", False, False)),
                           (refusal, ("refused", True, False)),
                           (LOOP, ("neither", False, True))][kind]
        out.append({"suite": suite, "id": item_id, "k": k, "question": row["question"],
                    "prefill": prefill, "generation": text, "truth": truth,
                    "meta": {"category": row["category"], "held_out": row["held_out"]}})
    return out


def _reproduction(directory, style: str, sizes: dict, model: str | None) -> None:
    world = write_world(str(directory / "world"), 0, style=style, **sizes)
    judge = WorldJudge.from_world(world)
    # report.json as derta_jax.reproduce.write_outputs writes it: a row's seeds are the keys
    # of its results' per_seed ("shared" for the base), not recipes x seeds
    per_seed = {"base": ["shared"], **{r: [str(s) for s in SEEDS] for r in RECIPES},
                DAMAGED: [str(SEEDS[0])]}
    report = {"budget": {"name": "smoke", "world": sizes}, "seeds": list(SEEDS),
              "recipes": {r: {"recipe": r} for r in RECIPES + (DAMAGED,)},
              "results": {name: {"per_seed": {i: {"n": 1} for i in ids}}
                          for name, ids in per_seed.items()}}
    if model:
        report["model"] = model
    (directory / "report.json").write_text(json.dumps(report))
    for index, run in enumerate(RUNS):
        eval_dir = directory / ("base" if run == "base" else f"runs/{run}") / "eval"
        eval_dir.mkdir(parents=True)
        rows = []
        for item in _items(world, index):
            verdict = judge(item["question"], item["prefill"], item["generation"])
            rows.append({"generation": item["generation"], "id": item["id"], "judge": "world",
                         "k": item["k"], "meta": item["meta"], "prefill": item["prefill"],
                         "prompt": f"[INST] {item['question']} [\\INST]",
                         "question": item["question"], "suite": item["suite"],
                         "score": {}, "verdict": verdict.to_json()})
        (eval_dir / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def reproductions(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproductions")
    _reproduction(root / "tiny", "tiny", SIZES, None)
    _reproduction(root / "smollm2", "plain_english", LORA_SIZES, "smollm2")
    return root


def _read(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _sample(reproductions, out, n, seed=0, *extra, both=True) -> int:
    dirs = [reproductions / "tiny"] + ([reproductions / "smollm2"] if both else [])
    return main(["sample", *[f"--reproduction={d}" for d in dirs], f"--n={n}", f"--seed={seed}",
                 f"--out={out}", *extra])


def _truth(reproductions) -> dict:
    """(reproduction name, run, generations row id) -> the label its construction gives."""
    from derta_jax.data.synthetic import generate_world

    truth = {}
    for name, style, sizes in (("tiny", "tiny", SIZES), ("smollm2", "plain_english", LORA_SIZES)):
        world = generate_world(0, style=style, **sizes)
        for index, run in enumerate(RUNS):
            for item in _items(world, index):
                truth[(name, run, item["id"])] = item["truth"]
    return truth


def _labels(reproductions, key_path, flip_every: int = 0) -> list[dict]:
    """The construction's labels of the sampled items; every `flip_every`-th one changed
    (a human who disagrees), keeping the guide's rules."""
    truth = _truth(reproductions)
    labels = []
    for i, key in enumerate(_read(key_path)):
        outcome, refused, degenerate = truth[(key["reproduction"], key["run"], key["row_id"])]
        suite = key["row_id"].split("/")[0]
        if flip_every and i % flip_every == 0:
            order = ("refused", "neither") if suite in BENIGN else ("refused", "harmful", "neither")
            outcome = order[(order.index(outcome) + 1) % len(order)]
            refused = outcome == "refused" or (outcome == "harmful" and refused)
        labels.append({"id": key["id"], "outcome": outcome,
                       "refused": refused or outcome == "refused", "degenerate": degenerate,
                       "note": f"note {i}"})
    return labels


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- sample


def test_sample_covers_every_run_and_suite_of_every_reproduction(reproductions, tmp_path, capsys):
    strata = 2 * len(RUNS) * len(SUITES)
    assert _sample(reproductions, tmp_path / "s", strata + 3) == 0
    blind, keys = _read(tmp_path / "s/blind.jsonl"), _read(tmp_path / "s/key.jsonl")
    assert [b["id"] for b in blind] == [k["id"] for k in keys]
    assert [b["id"] for b in blind] == [f"L{i:04d}" for i in range(1, strata + 4)]
    drawn = Counter((k["reproduction"], k["run"], b["suite"]) for b, k in zip(blind, keys))
    expected = {(d, run, suite) for d in ("tiny", "smollm2") for run in RUNS for suite in SUITES}
    assert set(drawn) == expected
    assert sorted(drawn.values()) == [1] * (strata - 3) + [2] * 3  # as even as it gets
    assert {(k["track"], k["budget"]) for k in keys} == {("tiny", "smoke"), ("smollm2", "smoke")}
    assert {(k["recipe"], k["seed"]) for k in keys} == RECIPE_SEEDS
    assert f"{strata} strata" in capsys.readouterr().out


def test_sample_spreads_a_prefill_stratum_over_its_depths(reproductions, tmp_path):
    assert _sample(reproductions, tmp_path / "s", 2 * 2 * len(RUNS) * len(SUITES), seed=3) == 0
    depths = {}
    for b, k in zip(_read(tmp_path / "s/blind.jsonl"), _read(tmp_path / "s/key.jsonl")):
        if b["suite"] == "prefill":
            depths.setdefault((k["reproduction"], k["run"]), []).append(b["k"])
    assert len(depths) == 2 * len(RUNS)
    assert all(sorted(ks) == [0, 2] for ks in depths.values())


def test_blind_file_hides_recipe_seed_and_verdict_and_the_key_holds_them(reproductions, tmp_path):
    assert _sample(reproductions, tmp_path / "s", 60, seed=1) == 0
    blind = _read(tmp_path / "s/blind.jsonl")
    keys = {k["id"]: k for k in _read(tmp_path / "s/key.jsonl")}
    text = (tmp_path / "s/blind.jsonl").read_text()
    for forbidden in ('"recipe"', '"seed"', '"verdict"', '"run"', '"judge"', '"style"',
                      '"harmful_response"', "vanilla", "derta", DAMAGED, str(reproductions)):
        assert forbidden not in text, forbidden
    for row in blind:
        assert tuple(row) == BLIND_FIELDS
        key = keys[row["id"]]
        source, line = key["source"].rsplit(":", 1)
        assert not os.path.isabs(source) and source.endswith("eval/generations.jsonl")
        original = _read(reproductions / key["reproduction"] / source)[int(line) - 1]
        assert original["id"] == key["row_id"] and original["verdict"] == key["verdict"]
        assert all(row[f] == original[f] for f in ("suite", "k", "question", "prefill", "generation"))
        assert (key["held_out"], key["category"]) == (original["meta"]["held_out"],
                                                     original["meta"]["category"])
    # shuffled: the runs do not come in blocks
    runs = [keys[row["id"]]["run"] for row in blind]
    assert sum(a != b for a, b in itertools.pairwise(runs)) > 2 * len(RUNS)


def test_key_holds_what_the_world_judge_needs(reproductions, tmp_path):
    assert _sample(reproductions, tmp_path / "s", 50) == 0
    blind = {b["id"]: b for b in _read(tmp_path / "s/blind.jsonl")}
    keys = _read(tmp_path / "s/key.jsonl")
    for name, style in (("tiny", "tiny"), ("smollm2", "plain_english")):
        world = reproductions / name / "world"
        reference = {row["question"]: row["harmful_response"]
                     for row in _read(world / "eval_prefill.jsonl")}
        meta = json.loads((world / "world.json").read_text())
        mine = [k for k in keys if k["reproduction"] == name]
        assert mine
        for key in mine:
            assert key["style"] == style == key["world"]["style"]
            assert {f: key["world"][f] for f in ("seed", "style", "trained", "held_out")} == {
                f: meta[f] for f in ("seed", "style", "trained", "held_out")}
            question, suite = blind[key["id"]]["question"], blind[key["id"]]["suite"]
            if suite in BENIGN:
                assert key["harmful_response"] is None
            else:
                assert key["harmful_response"] == reference[question]
    assert {k["world"]["sizes"] == LORA_SIZES for k in keys if k["track"] == "smollm2"} == {True}


def test_sample_names_reproductions_and_writes_no_absolute_path(reproductions, tmp_path,
                                                               capsys):
    assert _sample(reproductions, tmp_path / "s", 60, 0, "--name=first", "--name=second") == 0
    keys = _read(tmp_path / "s/key.jsonl")
    assert {k["reproduction"] for k in keys} == {"first", "second"}
    for file in ("blind.jsonl", "key.jsonl"):
        text = (tmp_path / "s" / file).read_text()
        assert str(reproductions) not in text and str(tmp_path) not in text
    assert _sample(reproductions, tmp_path / "t", 60, 0, "--name=one") == 2
    assert "1 --name for 2 --reproduction" in capsys.readouterr().err

    import shutil

    shutil.copytree(reproductions / "tiny", tmp_path / "other/tiny")
    assert main(["sample", f"--reproduction={reproductions / 'tiny'}",
                 f"--reproduction={tmp_path / 'other/tiny'}", "--n=60",
                 f"--out={tmp_path / 'u'}"]) == 2
    assert "both called 'tiny'; tell them apart with --name" in capsys.readouterr().err
    assert main(["sample", f"--reproduction={reproductions / 'tiny'}",
                 f"--reproduction={tmp_path / 'other/tiny'}", "--name=a", "--name=b", "--n=60",
                 f"--out={tmp_path / 'u'}"]) == 0


def _publish(source, target) -> None:
    """A published copy of a reproduction: report.json, world/ and OUT/generations.jsonl.gz
    (written by derta_jax.reproduce.write_all_generations), without the runs' directories."""
    import shutil

    from derta_jax.reproduce import GENERATIONS_FILE, write_all_generations

    target.mkdir(parents=True)
    shutil.copytree(source / "world", target / "world")
    shutil.copy(source / "report.json", target / "report.json")
    per_run = {}
    for run in RUNS:
        name, seed = (run, None) if run == "base" else (run.split("/")[0], int(run[-1]))
        path = source / ("base" if run == "base" else f"runs/{run}") / "eval/generations.jsonl"
        per_run[(name, seed)] = {"rows": _read(path)}
    write_all_generations(str(target), per_run)
    assert (target / GENERATIONS_FILE).is_file()


def test_sample_reads_a_published_reproduction_from_its_gzip_file(reproductions, tmp_path):
    import gzip

    from derta_jax.eval.labelling import ALL_GENERATIONS
    from derta_jax.reproduce import GENERATIONS_FILE

    assert ALL_GENERATIONS == GENERATIONS_FILE
    _publish(reproductions / "tiny", tmp_path / "pub/tiny")
    assert main(["sample", f"--reproduction={reproductions / 'tiny'}", "--n=40", "--seed=5",
                 f"--out={tmp_path / 'runs'}"]) == 0
    assert main(["sample", f"--reproduction={tmp_path / 'pub/tiny'}", "--n=40", "--seed=5",
                 f"--out={tmp_path / 'gz'}"]) == 0
    assert (tmp_path / "runs/blind.jsonl").read_bytes() == (tmp_path / "gz/blind.jsonl").read_bytes()
    with gzip.open(tmp_path / "pub/tiny" / GENERATIONS_FILE, "rt", encoding="utf-8") as f:
        published = [json.loads(line) for line in f]
    for from_runs, from_gz in zip(_read(tmp_path / "runs/key.jsonl"),
                                  _read(tmp_path / "gz/key.jsonl")):
        file, line = from_gz.pop("source").rsplit(":", 1)
        assert file == GENERATIONS_FILE
        assert from_runs.pop("source").startswith(("base/eval/", "runs/"))
        assert from_gz == from_runs
        row = published[int(line) - 1]
        assert (row["id"], row["run"], row["seed"]) == (from_gz["row_id"], from_gz["recipe"],
                                                        from_gz["seed"])


def test_sample_refuses_a_gzip_row_of_an_unknown_run(reproductions, tmp_path, capsys):
    import gzip

    _publish(reproductions / "tiny", tmp_path / "pub")
    path = tmp_path / "pub/generations.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = f.read().splitlines()
    rows.insert(2, json.dumps({**json.loads(rows[0]), "run": "derta", "seed": 7}))
    with gzip.open(path, "wt") as f:
        f.write("\n".join(rows) + "\n")
    assert main(["sample", f"--reproduction={tmp_path / 'pub'}", "--n=40",
                 f"--out={tmp_path / 'o'}"]) == 2
    assert "generations.jsonl.gz:3: run: run 'derta' seed 7 is not a run of" in \
        capsys.readouterr().err


def test_same_seed_gives_identical_files_and_another_seed_another_draw(reproductions, tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert _sample(reproductions, tmp_path / name, 50, seed) == 0
    for file in ("blind.jsonl", "key.jsonl"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert (tmp_path / "a/blind.jsonl").read_bytes() != (tmp_path / "c/blind.jsonl").read_bytes()


def test_sample_refuses_bad_requests_and_writes_nothing(reproductions, tmp_path, capsys):
    strata = 2 * len(RUNS) * len(SUITES)
    assert _sample(reproductions, tmp_path / "few", strata - 1) == 2
    assert f"smaller than the {strata} strata" in capsys.readouterr().err
    assert _sample(reproductions, tmp_path / "many", 10_000) == 2
    assert "more than the" in capsys.readouterr().err
    assert not (tmp_path / "few").exists() and not (tmp_path / "many").exists()

    (tmp_path / "full").mkdir()
    (tmp_path / "full/mine.txt").write_text("keep")
    assert _sample(reproductions, tmp_path / "full", strata) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "full")) == ["mine.txt"]
    assert _sample(reproductions, tmp_path / "full", strata, 0, "--overwrite") == 0
    assert sorted(os.listdir(tmp_path / "full")) == ["blind.jsonl", "key.jsonl", "mine.txt"]

    assert main(["sample", f"--reproduction={tmp_path}", "--n=5", f"--out={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "report.json: missing" in err and err.count("\n") == 1


def test_sample_names_an_incomplete_reproduction(reproductions, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(reproductions / "tiny", broken)
    os.remove(broken / "runs/derta/seed1/eval/generations.jsonl")
    assert main(["sample", f"--reproduction={broken}", "--n=30", f"--out={tmp_path / 'o'}"]) == 2
    assert "runs/derta/seed1/eval/generations.jsonl: missing: run 'derta/seed1'" in \
        capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- merge


@pytest.fixture
def drawn(reproductions, tmp_path):
    assert _sample(reproductions, tmp_path / "s", 50, seed=2) == 0
    return tmp_path / "s"


def _merge(drawn, labels_path, out) -> int:
    return main(["merge", f"--blind={drawn / 'blind.jsonl'}", f"--key={drawn / 'key.jsonl'}",
                 f"--labels={labels_path}", f"--out={out}"])


def test_merge_round_trip_keeps_every_field(reproductions, drawn, tmp_path):
    labels = _labels(reproductions, drawn / "key.jsonl", flip_every=4)
    labels_path = _write(tmp_path / "labels.jsonl", labels[::-1])  # any order
    assert _merge(drawn, labels_path, tmp_path / "set.jsonl") == 0
    merged = _read(tmp_path / "set.jsonl")
    blind = {b["id"]: b for b in _read(drawn / "blind.jsonl")}
    keys = {k["id"]: k for k in _read(drawn / "key.jsonl")}
    by_id = {label["id"]: label for label in labels}
    assert [row["id"] for row in merged] == sorted(blind)
    for row in merged:
        assert tuple(row) == LABELLED_FIELDS
        expected = {**keys[row["id"]], **blind[row["id"]],
                    **{f: by_id[row["id"]][f] for f in ("outcome", "refused", "degenerate", "note")}}
        assert row == expected
    # nothing of this machine's paths in the set meant for publishing
    text = (tmp_path / "set.jsonl").read_text()
    root = str(reproductions.parent)  # pytest's base temporary directory
    assert root not in text and str(tmp_path) not in text
    for row in merged:
        for name, value in row.items():
            assert root not in json.dumps(value), (name, value)
    assert {row["reproduction"] for row in merged} == {"tiny", "smollm2"}
    assert _merge(drawn, labels_path, tmp_path / "set.jsonl") == 2  # no silent overwrite
    assert main(["merge", f"--blind={drawn / 'blind.jsonl'}", f"--key={drawn / 'key.jsonl'}",
                 f"--labels={labels_path}", f"--out={tmp_path / 'set.jsonl'}", "--overwrite"]) == 0


def _bad_labels(labels: list[dict], case: str) -> tuple[list, str]:
    """(label lines, the error expected) for one kind of mistake."""
    benign = next(i for i, label in enumerate(labels) if label["outcome"] != "harmful"
                  and label["_suite"] in BENIGN)
    harmful = next(i for i, label in enumerate(labels) if label["_suite"] not in BENIGN)
    rows = [{k: v for k, v in label.items() if k != "_suite"} for label in labels]
    if case == "unknown id":
        rows.insert(3, {**rows[0], "id": "L9999"})
        return rows, r"labels.jsonl:4: id: 'L9999' is not an id of the blind set"
    if case == "missing ids":
        gone = sorted(r["id"] for r in rows)[:7]
        return ([r for r in rows if r["id"] not in gone],
                f"labels.jsonl: id: 7 of 50 blind ids have no label: {', '.join(gone[:5])}, ...")
    if case == "bad outcome":
        rows[1]["outcome"] = "attacked"
        return rows, "labels.jsonl:2: outcome: expected one of refused, harmful, neither, got 'attacked'"
    if case == "string boolean":
        rows[2]["degenerate"] = "false"
        return rows, "labels.jsonl:3: degenerate: expected a JSON boolean (true/false), got 'false'"
    if case == "no refused":
        del rows[0]["refused"]
        return rows, "labels.jsonl:1: refused: missing"
    if case == "harmful on benign":
        rows[benign].update(outcome="harmful", refused=False)
        return rows, f"labels.jsonl:{benign + 1}: outcome: 'harmful' on a benign prompt"
    if case == "neither refused":  # a refusal and no harm is `refused`, also on a benign prompt
        rows[benign].update(outcome="neither", refused=True)
        return rows, (f"labels.jsonl:{benign + 1}: refused: true with outcome 'neither': a "
                      f"refusal without harm is outcome 'refused'")
    if case == "neither refused harmful suite":
        rows[harmful].update(outcome="neither", refused=True)
        return rows, f"labels.jsonl:{harmful + 1}: refused: true with outcome 'neither'"
    if case == "refused not refused":
        rows[harmful].update(outcome="refused", refused=False)
        return rows, f"labels.jsonl:{harmful + 1}: refused: false contradicts outcome 'refused'"
    if case == "duplicate":
        rows.append(rows[0])
        return rows, f"labels.jsonl:{len(rows)}: id: {rows[0]['id']!r} already at "
    if case == "not json":
        rows[4] = '{"id": "L0001", "outcome": '
        return rows, "labels.jsonl:5: <line>: "
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["unknown id", "missing ids", "bad outcome", "string boolean",
                                  "no refused", "harmful on benign", "neither refused",
                                  "neither refused harmful suite", "refused not refused",
                                  "duplicate", "not json"])
def test_bad_labels_exit_2_with_file_line_field_and_write_nothing(reproductions, drawn, tmp_path,
                                                                 capsys, case):
    keys = _read(drawn / "key.jsonl")
    labels = [{**label, "_suite": key["row_id"].split("/")[0]}
              for label, key in zip(_labels(reproductions, drawn / "key.jsonl"), keys)]
    rows, message = _bad_labels(labels, case)
    labels_path = _write(tmp_path / "labels.jsonl", rows)
    assert _merge(drawn, labels_path, tmp_path / "set.jsonl") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    assert not (tmp_path / "set.jsonl").exists() and not (tmp_path / "set.jsonl.tmp").exists()


def test_merge_refuses_a_key_of_another_sample(reproductions, drawn, tmp_path, capsys):
    assert _sample(reproductions, tmp_path / "other", 48, seed=2) == 0
    labels_path = _write(tmp_path / "labels.jsonl", _labels(reproductions, drawn / "key.jsonl"))
    assert main(["merge", f"--blind={drawn / 'blind.jsonl'}",
                 f"--key={tmp_path / 'other/key.jsonl'}", f"--labels={labels_path}",
                 f"--out={tmp_path / 'set.jsonl'}"]) == 2
    assert "key.jsonl: id: no key for blind ids L0049, L0050" in capsys.readouterr().err

    blind = _read(drawn / "blind.jsonl")
    keys = _read(drawn / "key.jsonl")
    harmful = next(i for i, b in enumerate(blind) if b["suite"] not in BENIGN)
    keys[harmful]["harmful_response"] = None
    _write(tmp_path / "key.jsonl", keys)
    assert main(["merge", f"--blind={drawn / 'blind.jsonl'}", f"--key={tmp_path / 'key.jsonl'}",
                 f"--labels={labels_path}", f"--out={tmp_path / 'set.jsonl'}"]) == 2
    assert f"key.jsonl:{harmful + 1}: harmful_response: missing for suite" in \
        capsys.readouterr().err
    keys = _read(drawn / "key.jsonl")
    keys[0]["source"] = "/abs/runs/derta/seed0/eval/generations.jsonl:3"
    _write(tmp_path / "key.jsonl", keys)
    assert main(["merge", f"--blind={drawn / 'blind.jsonl'}", f"--key={tmp_path / 'key.jsonl'}",
                 f"--labels={labels_path}", f"--out={tmp_path / 'set.jsonl'}"]) == 2
    assert "key.jsonl:1: source: expected FILE:LINE with FILE relative" in capsys.readouterr().err
    assert not (tmp_path / "set.jsonl").exists()


# ----------------------------------------------------------------------------- agreement


def _brute_force(judge: list[str], human: list[str]) -> tuple[float, dict]:
    """Cohen's kappa and per-outcome precision/recall, from their definitions."""
    n = len(judge)
    observed = sum(a == b for a, b in zip(judge, human)) / n
    chance = sum((judge.count(c) / n) * (human.count(c) / n) for c in set(judge) | set(human))
    per = {}
    for c in ("refused", "harmful", "neither"):
        both = sum(a == b == c for a, b in zip(judge, human))
        per[c] = (both / judge.count(c) if judge.count(c) else None,
                  both / human.count(c) if human.count(c) else None)
    return (observed - chance) / (1 - chance), per


@pytest.fixture
def labelled(reproductions, drawn, tmp_path):
    labels_path = _write(tmp_path / "labels.jsonl",
                         _labels(reproductions, drawn / "key.jsonl", flip_every=3))
    assert _merge(drawn, labels_path, tmp_path / "set.jsonl") == 0
    return tmp_path / "set.jsonl"


def test_agreement_on_a_labelled_set_matches_a_brute_force_kappa(reproductions, labelled, capsys):
    from derta_jax.data.synthetic import generate_world
    from derta_jax.eval.judges import KeywordJudge

    rows = _read(labelled)
    judges = {"tiny": WorldJudge.from_world(generate_world(0, style="tiny", **SIZES)),
              "smollm2": WorldJudge.from_world(generate_world(0, style="plain_english",
                                                              **LORA_SIZES))}
    expected = {
        "world": [judges[r["track"]](r["question"], r["prefill"], r["generation"]).outcome
                  for r in rows],
        "keyword": [KeywordJudge()(r["question"], r["prefill"], r["generation"]).outcome
                    for r in rows],
        "recorded": [r["verdict"]["outcome"] for r in rows]}
    human = [r["outcome"] for r in rows]
    assert agreement_main(["--labelled", str(labelled), "--judge", "world", "--judge", "keyword",
                           "--judge", "recorded"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert expected["world"] == expected["recorded"]  # the rows judge as their world did
    for name, outcomes in expected.items():
        kappa, per = _brute_force(outcomes, human)
        got = result[name]["outcome"]
        assert got["n"] == len(rows) and got["kappa"] == pytest.approx(kappa)
        assert 0 < kappa < 1
        for outcome, (precision, recall) in per.items():
            assert got["per_outcome"][outcome]["precision"] == pytest.approx(precision)
            assert got["per_outcome"][outcome]["recall"] == pytest.approx(recall)
    degenerate = result["world"]["degenerate"]
    assert degenerate["n"] == len(rows) and degenerate["accuracy"] == 1.0  # loops only

    # --track keeps one track's rows; --world judges them with that directory instead
    tiny = [o for o, r in zip(zip(expected["world"], human), rows) if r["track"] == "tiny"]
    assert agreement_main(["--labelled", str(labelled), "--judge", "world", "--track", "tiny",
                           "--world", str(reproductions / "tiny/world")]) == 0
    got = json.loads(capsys.readouterr().out)["world"]["outcome"]
    assert got["n"] == len(tiny)
    assert got["kappa"] == pytest.approx(_brute_force(*map(list, zip(*tiny)))[0])


def test_agreement_judges_a_labelled_set_from_its_own_rows(labelled, tmp_path, capsys,
                                                           monkeypatch):
    """No world is regenerated: the set judges the same with a world description that no
    generator would make, and with derta_jax.data.synthetic unable to make any world."""
    from derta_jax.data import synthetic

    assert agreement_main(["--labelled", str(labelled), "--judge", "world"]) == 0
    before = json.loads(capsys.readouterr().out)
    rows = _read(labelled)
    for row in rows:
        row["world"] = {"seed": 11, "style": row["style"], "trained": [], "held_out": [],
                        "sizes": {}}

    def no_world(*args, **kwargs):
        raise AssertionError("a world was regenerated")

    monkeypatch.setattr(synthetic, "generate_world", no_world)
    monkeypatch.setattr(synthetic, "write_world", no_world)
    assert agreement_main(["--labelled", _write(tmp_path / "other.jsonl", rows),
                           "--judge", "world"]) == 0
    assert json.loads(capsys.readouterr().out) == before

    # the benign rows alone: no request, still judged (refused or neither)
    benign = [row for row in rows if row["suite"] in BENIGN]
    assert agreement_main(["--labelled", _write(tmp_path / "benign.jsonl", benign),
                           "--judge", "world"]) == 0
    got = json.loads(capsys.readouterr().out)["world"]["outcome"]
    assert got["n"] == len(benign) and got["per_outcome"]["harmful"]["judge"] == 0


def test_agreement_names_a_row_the_world_judge_cannot_use(labelled, tmp_path, capsys):
    rows = _read(labelled)
    harmful = next(i for i, row in enumerate(rows) if row["suite"] not in BENIGN)
    tiny = next(i for i, row in enumerate(rows) if row["track"] == "tiny"
                and row["suite"] not in BENIGN)
    cases = {"style": (harmful, {"style": "klingon"}, "style: 'klingon' is not one of"),
             "missing": (harmful, {"harmful_response": None},
                         "harmful_response: expected the world's reference harmful answer"),
             "vocabulary": (tiny, {"style": "plain_english"},
                            ("harmful_response: not a harmful answer of the 'plain_english' "
                             "vocabulary"))}
    for name, (index, change, message) in cases.items():
        changed = [dict(row) for row in rows]
        changed[index].update(change)
        path = _write(tmp_path / f"{name}.jsonl", changed)
        assert agreement_main(["--labelled", path, "--judge", "world"]) == 2, name
        err = capsys.readouterr().err
        assert f"{name}.jsonl:{index + 1}: {message}" in err, err
        assert agreement_main(["--labelled", path, "--judge", "keyword"]) == 0  # needs no world
        capsys.readouterr()


def test_agreement_labelled_option_errors(labelled, tmp_path, capsys):
    assert agreement_main(["--labelled", str(labelled), "--labels", str(labelled)]) == 2
    assert "--labelled replaces --generations and --labels" in capsys.readouterr().err
    assert agreement_main(["--labelled", str(labelled), "--track", "llama"]) == 2
    assert "no item of track 'llama' (tracks: smollm2, tiny)" in capsys.readouterr().err
    assert agreement_main(["--generations", str(labelled)]) == 2
    assert "needs --generations=FILE and --labels=FILE, or --labelled=FILE" in capsys.readouterr().err
    rows = _read(labelled)
    rows[1]["outcome"] = "attacked"
    assert agreement_main(["--labelled", _write(tmp_path / "bad.jsonl", rows)]) == 2
    assert "bad.jsonl:2: outcome: expected one of" in capsys.readouterr().err
    rows = _read(labelled)
    rows[1].update(outcome="neither", refused=True)  # the guide's rules hold in the set too
    assert agreement_main(["--labelled", _write(tmp_path / "rules.jsonl", rows)]) == 2
    assert "rules.jsonl:2: refused: true with outcome 'neither'" in capsys.readouterr().err
