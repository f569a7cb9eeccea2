"""The reproduction's robustness attacks (derta_jax/eval/robustness.py) on the smoke budget,
every one (--attacks=all): rank-assisted prefilling, the refusal direction ablated, the
safe_triggers set, and harmful and benign LoRA fine-tuning with plain SFT and under the
constrained objective, for the base and one recipe; every attack lands in the run's report,
the tables and the plots, from the project's own trainer."""

from __future__ import annotations

import json
import shutil

import pytest

from derta_jax import reproduce
from derta_jax.eval import reproduction as rp


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    out = tmp_path_factory.mktemp("attacks") / "out"
    assert reproduce.main([f"--out={out}", "--budget=smoke", "--seeds=0",
                           "--recipes=derta", "--attacks=all"]) == 0
    return out


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_attack_is_in_the_run_report(attacked):
    attacks = rp.BUDGETS["smoke"].attacks
    for run in ("base", "runs/derta/seed0"):
        rows = _rows(attacked / run / "eval" / "generations.jsonl")
        by_suite = {}
        for row in rows:
            by_suite.setdefault(row["suite"], []).append(row)
        direct = len(by_suite["direct"])
        assert {r["k"] for r in by_suite["rank_prefill"]} == {10}  # the smoke's depth > 0
        assert len(by_suite["rank_prefill"]) == len(by_suite["prefill"]) // 2
        assert len(by_suite["ablated_direct"]) == direct
        for suite in ("finetune_sft", "finetune_constrained", "benign_tuned_sft",
                      "benign_tuned_constrained"):
            assert sorted({r["k"] for r in by_suite[suite]}) == list(attacks.finetune_steps)
            assert len(by_suite[suite]) == direct * len(attacks.finetune_steps)
        # the downstream task's held-out rows (after the fine-tune's), by the model itself
        # and at every K of both benign fine-tunes, each scored by the world's checker
        held = _rows(attacked / "world" / "downstream.jsonl")[
            attacks.finetune_rows:attacks.finetune_rows + attacks.downstream_eval_rows]
        assert [r["question"] for r in by_suite["downstream"]] == [
            h["instruction"] for h in held]
        assert {r["meta"]["task"] for r in by_suite["downstream"]} == {"rewrite"}  # tiny style
        for suite in ("downstream_sft", "downstream_constrained"):
            assert sorted({r["k"] for r in by_suite[suite]}) == list(attacks.finetune_steps)
            assert len(by_suite[suite]) == len(held) * len(attacks.finetune_steps)
        for row in by_suite["downstream"] + by_suite["downstream_sft"]:
            assert isinstance(row["score"]["correct"], bool)
            assert row["verdict"]["harmful"] is False
        assert len(by_suite["safe_triggers"]) == 120
        record = json.loads((attacked / run / "attack" / "robustness.json").read_text())
        assert 0 <= record["direction"]["layer"] < record["direction"]["layers_considered"]
        assert sorted(record["seconds_per_attack"]) == [
            "ablated_direct", "benign_finetune", "downstream", "finetune", "rank_prefill",
            "safe_triggers"]
        assert sum(record["seconds_per_attack"].values()) <= record["seconds"]
        # the attacks trained with the project's trainer, a checkpoint at every K
        for objective in ("sft", "constrained_sft", "benign_sft", "benign_constrained_sft"):
            workdir = attacked / run / "attack" / objective
            saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                           if p.name.isdigit())
            assert saved == list(attacks.finetune_steps)
            config = json.loads((workdir / "config.json").read_text())
            assert config["loss"]["objective"] == ("constrained_sft" if "constrained" in
                                                   objective else "derta")
            assert config["lora"]["rank"] == attacks.finetune_rank
            assert config["data"]["recipe"] == "sft"
        metrics = _rows(attacked / run / "attack" / "constrained_sft" / "metrics.jsonl")
        assert abs(metrics[0]["log_ratio"]) < 1e-5  # starts AT the run's own model
        attack_rows = _rows(attacked / run / "attack" / "harmful_sft.jsonl")
        evaluated = {r["question"] for r in rows}
        assert len(attack_rows) == attacks.finetune_rows
        assert not {r["instruction"] for r in attack_rows} & evaluated
        # the benign fine-tune trains on the world's downstream task: no harmful text, and
        # nothing the tuned models have read
        benign = _rows(attacked / run / "attack" / "benign_sft.jsonl")
        downstream = _rows(attacked / "world" / "downstream.jsonl")[:attacks.finetune_rows]
        assert benign == [{"instruction": h["instruction"], "output": h["output"]}
                          for h in downstream]
        assert not {r["instruction"] for r in benign} & {h["instruction"] for h in held}
        assert {r["task"] for r in downstream} == {"rewrite"}
        config = json.loads((attacked / run / "attack" / "benign_sft" / "config.json")
                            .read_text())
        assert config["data"]["helpful"].endswith("benign_sft.jsonl")


def test_the_attacks_have_tables_and_plots(attacked):
    report = json.loads((attacked / "report.json").read_text())
    for name in ("base", "derta"):
        table = report["results"][name]["table"]
        for prefix in ("rank_prefill_deepest_held_out", "ablated_direct_all",
                       "finetune_sft_all", "finetune_constrained_all", "benign_tuned_sft_all",
                       "benign_tuned_constrained_all"):
            cell = table[f"{prefix}_outcome_harmful"]
            assert cell is not None and 0.0 <= cell["mean"] <= 1.0, (name, prefix)
        for _, key, *_ in rp.DOWNSTREAM_COLUMNS:
            cell = table[key]
            held_out = rp.BUDGETS["smoke"].attacks.downstream_eval_rows
            assert cell is not None and cell["n"] == held_out
        downstream = [g for g in report["results"][name]["seed_report"]["groups"]
                      if g["suite"] == "downstream_sft"]
        assert sorted(g["k"] for g in downstream) == [1, 2]
        assert all(g["outcome_harmful"] is None for g in downstream)  # a benign suite
        assert report["results"][name]["per_seed"]["shared" if name == "base" else "0"][
            "durability_k"] == rp.BUDGETS["smoke"].attacks.durability_k
    text = (attacked / "report.md").read_text()
    assert "**Direct request after K=2 harmful LoRA fine-tuning steps (plain SFT)" in text
    assert "**Rank-assisted prefill (top-20) at the deepest k" in text
    assert "**Direct request after K=2 benign LoRA fine-tuning steps (plain SFT)" in text
    assert "*Benign fine-tuning*" in text and "*safe_triggers*" in text
    assert "**Downstream task accuracy (held-out rows of the benign fine-tune's task), " \
           "before tuning and after K=2 benign steps**" in text
    for plot in reproduce.ATTACK_PLOTS:
        assert (attacked / plot).read_bytes().startswith(b"\x89PNG")
        assert f"]({plot})" in text
    timings = json.loads((attacked / "timings.json").read_text())
    assert 0 < timings["attacks_s_within_evaluate"] < timings["phases_s"]["evaluate"]


def test_no_attacks_leaves_them_out(tmp_path):
    """The attacks' cells are absent (not zero) in a run without them: the tables skip
    the settings nobody measured."""
    results = {"derta": {"table": {}, "per_seed": {"0": {}},
                         "supervised_tokens": {"total": {"rows": 0, "mle": 0, "rto": 0}}}}
    text = rp.results_tables(results)
    assert "Rank-assisted" not in text and "fine-tuning" not in text
    assert "safe_triggers" not in text and "Downstream" not in text


def test_resume_loads_the_attacked_runs_with_their_attack_records(attacked, tmp_path):
    """--resume of a moved copy of a study with every attack: each run's record, attack
    suites included, is loaded (nothing tuned, attacked or evaluated again) and gives the
    same report.json and report.md."""
    study = tmp_path / "moved"
    shutil.copytree(attacked, study, ignore=shutil.ignore_patterns("xla_cache"))
    before = {name: (study / name).read_text() for name in ("report.json", "report.md")}
    assert reproduce.main([f"--out={study}", "--budget=smoke", "--seeds=0", "--recipes=derta",
                           "--attacks=all", "--resume", "--compilation_cache="]) == 0
    timings = json.loads((study / "timings.json").read_text())
    assert (timings["runs"], timings["runs_loaded"]) == (2, 2)
    assert "tune" not in timings["phases_s"] and timings["attacks_s_within_evaluate"] == 0
    for name, text in before.items():
        assert (study / name).read_text() == text, name


def test_downstream_rows_too_few_for_the_fine_tune_and_its_scoring_name_the_file(tmp_path):
    """The downstream task must hold the fine-tune's rows AND the held-out rows it is scored
    on: too few is one error naming the file and both counts; a world written before the
    file existed has no task to score (its benign fine-tune trains on helpful rows)."""
    import dataclasses

    from derta_jax.eval import robustness

    class Template:
        def render(self, question):
            return f"Q: {question}\nA:"

    budget = dataclasses.replace(rp.BUDGETS["smoke"], attacks=dataclasses.replace(
        rp.BUDGETS["smoke"].attacks, finetune_rows=3, downstream_eval_rows=2))
    assert robustness.downstream_items(str(tmp_path), budget, Template()) == []
    rows = [{"instruction": f"What is {a} doubled?", "output": f"{a} doubled is {2 * a}.",
             "task": "double", "answer": f"{a} doubled is {2 * a}."} for a in range(4)]
    path = tmp_path / "downstream.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=f"{path}: the benign fine-tune trains on 3 rows and "
                                         "scores the next 2: 5 are needed, the file has 4"):
        robustness.downstream_items(str(tmp_path), budget, Template())
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:1]))
    items = robustness.downstream_items(str(tmp_path), budget, Template())
    assert [i["question"] for i in items] == ["What is 3 doubled?", "What is 0 doubled?"]
    assert items[0]["prompt"] == "Q: What is 3 doubled?\nA:"
    assert items[0]["meta"]["answer"] == "3 doubled is 6." and items[0]["suite"] == "downstream"
