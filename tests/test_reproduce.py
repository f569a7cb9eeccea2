"""`python -m derta_jax.reproduce`: the smoke budget end to end (twice, for determinism),
and the helpers of derta_jax/eval/reproduction.py against slow, obviously-correct versions."""

import json
import math
import os
import statistics

import numpy as np
import pytest

from derta_jax import reproduce
from derta_jax.eval import reproduction as rp

SMOKE_SEEDS = "0"


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Two smoke reproductions with the same seeds (sharing one XLA compilation cache)."""
    import jax

    root = tmp_path_factory.mktemp("reproduce")
    cache = str(root / "xla")
    outs = [str(root / "first"), str(root / "second")]
    try:
        for out in outs:
            assert reproduce.main([f"--out={out}", "--budget=smoke", f"--seeds={SMOKE_SEEDS}",
                                   f"--compilation_cache={cache}"]) == 0
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
    return outs


def test_smoke_run_writes_every_output(smoke_runs):
    out = smoke_runs[0]
    for name in ("report.md", "report.json", "timings.json", "asr_vs_prefill.png",
                 "base/eval/generations.jsonl",
                 "asr_vs_prefill_held_out.png", "refusal_positions.png",
                 "refusal_probability.png", "world/triples.jsonl", "world/tokenizer/tokenizer.json",
                 "base/hf/config.json", "base/hf/tokenizer.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    for recipe in rp.RECIPE_NAMES:
        for seed in SMOKE_SEEDS.split(","):
            eval_dir = os.path.join(out, "runs", recipe, f"seed{seed}", "eval")
            with open(os.path.join(eval_dir, "generations.jsonl"), encoding="utf-8") as f:
                rows = [json.loads(line) for line in f]
            assert {row["suite"] for row in rows} == set(rp.EVAL_SUITES)
            with open(os.path.join(eval_dir, "refusal_probabilities.jsonl"), encoding="utf-8") as f:
                curves = [json.loads(line) for line in f]
            held_out = [row for row in rows if row["suite"] == "prefill" and row["k"] == 0
                        and row["meta"]["held_out"]]
            assert len(curves) == len(held_out) > 0
            assert all(0.0 <= p <= 1.0 for curve in curves for p in curve["p_refusal"])


def test_smoke_table_has_a_row_per_recipe_and_rates_in_unit_interval(smoke_runs):
    with open(os.path.join(smoke_runs[0], "report.md"), encoding="utf-8") as f:
        lines = [line for line in f if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines[1:]] == [rp.BASE_NAME,
                                                                    *rp.RECIPE_NAMES]
    with open(os.path.join(smoke_runs[0], "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert sorted(report["results"]) == sorted([rp.BASE_NAME, *rp.RECIPE_NAMES])
    checked = 0
    for name, result in report["results"].items():
        seeds = 1 if name == rp.BASE_NAME else len(SMOKE_SEEDS.split(","))
        for key, cell in result["table"].items():
            if cell is None:
                continue
            assert len(cell["values"]) == cell["seeds"] == seeds
            for value in cell["values"] + [cell["mean"], cell["min"], cell["max"]]:
                assert 0.0 <= value <= 1.0, (key, value)
                checked += 1
            if "n" in cell:
                assert 0.0 <= cell["ci95_low"] <= cell["k"] / cell["n"] <= cell["ci95_high"] <= 1.0
    assert checked > 0


def test_smoke_recipes_supervise_what_they_should(smoke_runs):
    with open(os.path.join(smoke_runs[0], "report.json"), encoding="utf-8") as f:
        results = json.load(f)["results"]
    assert results["rto"]["supervised_tokens"]["rto"]["rto"] > 0
    assert results["vanilla"]["supervised_tokens"]["total"]["rto"] == 0
    assert results["prefix"]["supervised_tokens"]["total"]["rto"] == 0
    derta = results["derta"]["supervised_tokens"]
    assert derta["rto"]["rows"] == derta["harmful_prefix"]["rows"] > 0
    assert (results["vanilla"]["supervised_tokens"]["refusal"]["rows"]
            == 2 * results["vanilla_half"]["supervised_tokens"]["refusal"]["rows"])


def test_same_seeds_give_identical_report_json(smoke_runs):
    texts = []
    for out in smoke_runs:
        with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
            texts.append(f.read())
    assert texts[0] == texts[1]


def test_existing_output_is_refused_without_overwrite(smoke_runs, capsys):
    assert reproduce.main([f"--out={smoke_runs[0]}", "--budget=smoke", "--seeds=0",
                           "--compilation_cache="]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err


def test_real_model_track_without_its_weights_fails_before_writing(tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr(reproduce, "SMOLLM2_GGUF", "missing.gguf")
    assert reproduce.main([f"--out={tmp_path / 'x'}", "--model=smollm2",
                           "--compilation_cache="]) == 2
    assert "--model=smollm2 needs missing.gguf" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("text", ["0,0", "-1", "a,b", ""])
def test_bad_seeds_are_rejected(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="--seeds="):
        reproduce.parse_seeds(text)


def test_overwrite_removes_only_reproduction_outputs(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "old.txt").write_text("old")
    (tmp_path / "report.md").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    reproduce.prepare_out(str(tmp_path), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


# ----------------------------------------------------------------------------- helpers


def test_pooled_cell_matches_a_direct_computation():
    counts = [{"k": 3, "n": 10}, {"k": 7, "n": 20}, {"k": 0, "n": 5}]
    cell = rp.pooled_cell(counts + [None])
    values = [c["k"] / c["n"] for c in counts]
    assert cell["values"] == values
    assert math.isclose(cell["mean"], float(np.mean(values)))
    assert math.isclose(cell["std"], float(np.std(values, ddof=1)))
    assert (cell["k"], cell["n"]) == (10, 35)
    p, n, z = 10 / 35, 35, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert math.isclose(cell["ci95_low"], centre - half, rel_tol=1e-6)
    assert math.isclose(cell["ci95_high"], centre + half, rel_tol=1e-6)
    plain = rp.pooled_cell([0.25, None, 0.75])
    assert plain["mean"] == 0.5 and "n" not in plain and plain["seeds"] == 2
    assert rp.pooled_cell([None, None]) is None


def test_late_refusal_probability_averages_the_second_half_of_each_answer():
    rows = [[0.0, 0.1, 0.5, 0.7], [0.2, 0.4, 0.9]]
    slow = []
    for row in rows:
        for t, p in enumerate(row):
            if 2 * t >= len(row):
                slow.append(p)
    assert math.isclose(rp.late_refusal_probability(rows), statistics.fmean(slow))
    assert rp.late_refusal_probability([]) is None


def test_recipe_shares_and_epochs():
    budget = rp.BUDGETS["default"]
    assert rp.recipe_num_safety(budget, 1.0) == budget.num_safety
    assert rp.recipe_num_safety(budget, 0.5) == budget.num_safety // 2 - (budget.num_safety // 2) % 2
    # epochs_for must give at least the steps asked for even at the assumed packing loss
    for steps, tokens in ((150, 60_000), (1200, 140_000), (2, 500)):
        epochs = rp.epochs_for(steps, tokens, 16, 128)
        assert epochs * math.floor(tokens / (16 * 128) * 0.7) >= steps or epochs >= steps


def test_supervised_tokens_count_response_tokens(tmp_path, ):
    from derta_jax.data import synthetic
    from derta_jax.data.tokenizer_builder import build_bpe_tokenizer

    world = synthetic.write_world(str(tmp_path), 0, **rp.BUDGETS["smoke"].world)
    tokenizer = build_bpe_tokenizer(synthetic.world_texts(world), vocab_size=400)
    examples = rp.safety_mixture(str(tmp_path), "derta", 8, 0, tokenizer).examples
    counts = rp.supervised_tokens(examples, tokenizer, max_length=512)

    def response_tokens(example):  # the response's tokens, EOS included: the supervised span
        full = tokenizer(example.prompt + example.response)["input_ids"]
        return len(full) - len(tokenizer(example.prompt)["input_ids"])

    for kind in ("helpful", "rto", "harmful_prefix"):
        mine = [e for e in examples if e.kind == kind]
        expected = sum(response_tokens(e) for e in mine)
        assert counts[kind]["rows"] == len(mine)
        assert counts[kind]["rto" if kind == "rto" else "mle"] == expected
        assert counts[kind]["mle" if kind == "rto" else "rto"] == 0


def test_plotted_intervals_enclose_their_values(tmp_path):
    """Wilson bounds computed in floating point could miss 0/n and n/n by ~1e-17, which
    matplotlib rejects as a negative error bar; the plotted copy must enclose every value
    whatever the bounds it is given."""
    from derta_jax.eval.plots import plot_prefill_curves

    rates = {0: {"k": 0, "n": 7, "value": 0.0, "ci95_low": 1e-17, "ci95_high": 0.35},
             5: {"k": 10, "n": 10, "value": 1.0, "ci95_low": 0.72, "ci95_high": 1.0 - 1e-16}}
    report = {"groups": [{"suite": "prefill", "k": k, "held_out": None,
                          "asr_not_refused": rate} for k, rate in rates.items()]}
    fixed = rp.with_intervals_around_values(report)
    for group in fixed["groups"]:
        rate = group["asr_not_refused"]
        assert rate["ci95_low"] <= rate["value"] <= rate["ci95_high"]
    assert report["groups"][0]["asr_not_refused"]["ci95_low"] > 0  # the input is not changed
    plot_prefill_curves({"m": fixed}, str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_tuning_runs_use_the_budgets_rto_keep_rate(smoke_runs):
    """The tiny track is full fine-tuning: the paper's 5% RTO keep rate reaches every tuning
    run's resolved config, and report.json records it."""
    out = smoke_runs[0]
    for name in rp.RECIPE_NAMES:
        with open(os.path.join(out, "runs", name, "seed0", "workdir", "config.json")) as f:
            assert json.load(f)["loss"]["rto_keep_rate"] == rp.BUDGETS["smoke"].rto_keep_rate
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["budget"]["rto_keep_rate"] == 0.05


def test_rto_keep_rate_defaults_follow_the_paper_and_bad_values_are_refused(tmp_path, capsys):
    assert all(b.rto_keep_rate == 0.05 for b in rp.BUDGETS.values())  # full fine-tuning
    assert all(b.rto_keep_rate == 1.0 for b in rp.LORA_BUDGETS.values())  # LoRA
    config = rp.base_config(str(tmp_path / "w"), rp.BUDGETS["smoke"], seed=0, tokenizer_dir="t",
                            steps=2, lr=1e-3, epochs=1)
    assert config.loss.rto_keep_rate == 0.05
    assert reproduce.main([f"--out={tmp_path / 'x'}", "--budget=smoke", "--rto_keep_rate=0",
                           "--compilation_cache="]) == 2
    assert "--rto_keep_rate=0.0: must be in (0, 1]" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
