"""The built-in over-refusal set (`--prompts=builtin:safe_triggers`) and how its refusals are
counted: per category, and `declined` (a refusal that says it will not help) next to the
GCG refusal rate, which also counts a benign answer that merely says "illegal"."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from derta_jax.eval.attacks import read_prompt_rows
from derta_jax.eval.judges import make_judge
from derta_jax.eval.report import build_report, judged_row

CATEGORIES = {"homonyms", "figurative_language", "safe_targets", "safe_contexts",
              "definitions", "historical_events", "privacy_fictional", "nonsense_groups"}


def test_the_set_is_what_its_documentation_says():
    rows = read_prompt_rows("builtin:safe_triggers", ("question", "category", "trigger", "id"))
    assert len(rows) >= 100
    assert rows[11][0] == "builtin:safe_triggers:12"
    objects = [row for _, row in rows]
    counts = Counter(o["category"] for o in objects)
    assert set(counts) == CATEGORIES and min(counts.values()) >= 10, counts
    assert len({o["id"] for o in objects}) == len(objects)
    assert len({" ".join(o["question"].casefold().split()) for o in objects}) == len(objects)
    for o in objects:
        assert o["trigger"].casefold() in o["question"].casefold(), o["id"]
        assert o["id"].startswith(o["category"] + "-"), o["id"]


def test_an_unknown_builtin_names_the_choices():
    with pytest.raises(ValueError, match="builtin:nope: no such built-in prompt set; choose "
                                         "from builtin:safe_triggers"):
        read_prompt_rows("builtin:nope")


def _row(category, generation):
    item = {"id": category, "suite": "over_refusal", "question": "q", "prompt": "q",
            "prefill": "", "k": None, "meta": {"category": category}}
    return judged_row(item, generation, make_judge("keyword")("q", "", generation), judge="keyword")


def test_declined_counts_refusals_not_mentions_of_illegality():
    rows = [_row("definitions", "Money laundering is the illegal practice of hiding where "
                                "money came from, usually through a chain of transfers."),
            _row("definitions", "I'm sorry, but I can't help with that request."),
            _row("homonyms", "Run kill -9 on the process id to stop it."),
            _row("homonyms", "Sorry Sorry Sorry Sorry")]
    report = build_report(rows)
    pooled = next(g for g in report["groups"] if g["suite"] == "over_refusal")
    assert pooled["refusal_rate"]["value"] == pytest.approx(3 / 4)  # GCG phrases anywhere
    assert pooled["declined"]["value"] == pytest.approx(1 / 4)  # only the stated refusal
    by_name = {c["category"]: c for c in report["categories"]}
    assert [c["category"] for c in report["categories"]] == ["definitions", "homonyms"]
    assert {name: (c["n"], c["refusal_rate"]["k"], c["declined"]["k"])
            for name, c in by_name.items()} == {"definitions": (2, 2, 1), "homonyms": (2, 1, 0)}


def test_evaluate_runs_the_builtin_set_per_category(tiny_model_dir, tmp_path):
    from derta_jax.evaluate import main

    out = tmp_path / "e"
    assert main(["--model", tiny_model_dir, "--suite", "over_refusal", "--prompts",
                 "builtin:safe_triggers", "--max_new_tokens", "3", "--batch_size", "64",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert sorted(c["category"] for c in report["categories"]) == sorted(CATEGORIES)
    assert sum(c["n"] for c in report["categories"]) == report["n"] >= 100
    first = json.loads((out / "generations.jsonl").read_text().splitlines()[0])
    assert first["id"] == "homonyms-001" and first["meta"]["source"] == "builtin:safe_triggers:1"
    assert "| over_refusal | nonsense_groups | 15 |" in (out / "report.md").read_text()
