"""`python -m derta_jax.reproduce --model=smollm2`: the real-model track's code path.

SmolLM2-135M itself is too slow for CI (seconds per LoRA step on 2 cores, plus generation),
so the pipeline runs on a tiny random Llama with a chat-template tokenizer standing in for the
imported weights (reproduce's `base_hf_dir`). The GGUF import that supplies the real weights
is tested in tests/test_gguf_import.py.
"""

import json
import os

import pytest

from derta_jax import reproduce
from derta_jax.eval import reproduction as rp


@pytest.fixture(scope="module")
def stand_in_base(tmp_path_factory):
    """A tiny random Llama + a chat-template BPE tokenizer of the plain_english world."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from derta_jax.data import synthetic
    from derta_jax.data.tokenizer_builder import build_bpe_tokenizer

    directory = tmp_path_factory.mktemp("stand_in_base")
    texts = synthetic.world_texts(style="plain_english", **rp.LORA_BUDGETS["smoke"].world)
    tokenizer = build_bpe_tokenizer(texts, vocab_size=500,
                                    required_words=synthetic.single_token_strings())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def smoke_run(stand_in_base, tmp_path_factory):
    import jax

    root = tmp_path_factory.mktemp("smollm2")
    out = str(root / "out")
    # the five tunings compile the same step: once, as the CLI does with OUT/xla_cache
    settings = {"jax_compilation_cache_dir": str(root / "xla"),
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    saved = {name: getattr(jax.config, name) for name in settings}
    try:
        for name, value in settings.items():
            jax.config.update(name, value)
        # every attack is tested on the tiny track (tests/test_reproduce_attacks.py); here
        # one chosen attack (--attacks=safe_triggers) and a budget change (--set)
        report = reproduce.reproduce(out, seeds=(0,), budget_name="smoke", model="smollm2",
                                     base_hf_dir=stand_in_base, attacks=("safe_triggers",),
                                     settings=[("tune_lr", "5e-4"), ("lora_alpha", "4")])
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
    return out, report


RUNS = reproduce.TRACKS["smollm2"].default_runs


def test_smoke_run_tunes_with_lora_and_evaluates_every_recipe(smoke_run):
    out, report = smoke_run
    assert RUNS == ("vanilla", "derta", "derta_keep0.05")  # issue 16's track
    assert sorted(report["results"]) == sorted([rp.BASE_NAME, *RUNS])
    assert report["model"] == "smollm2" and report["template"] == "chat"
    keep_rates = {}
    for recipe in RUNS:
        run = os.path.join(out, "runs", recipe, "seed0")
        with open(os.path.join(run, "workdir", "lora.json"), encoding="utf-8") as f:
            record = json.load(f)
        assert record["rank"] == rp.LORA_BUDGETS["smoke"].lora_rank
        assert record["alpha"] == 4.0  # --set lora_alpha=4
        with open(os.path.join(run, "workdir", "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        keep_rates[recipe] = config["loss"]["rto_keep_rate"]
        assert config["optim"]["lr"] == 5e-4  # --set tune_lr=5e-4
        assert os.path.isfile(os.path.join(run, "hf", "config.json"))  # merged for evaluation
        with open(os.path.join(run, "eval", "generations.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        assert {row["suite"] for row in rows} == {*rp.EVAL_SUITES, "safe_triggers"}
        assert sum(row["suite"] == "safe_triggers" for row in rows) == 120
        with open(os.path.join(run, "attack", "robustness.json"), encoding="utf-8") as f:
            assert list(json.load(f)["seconds_per_attack"]) == ["safe_triggers"]
    assert keep_rates == {"vanilla": 1.0, "derta": 1.0, "derta_keep0.05": 0.05}
    assert report["recipes"]["derta_keep0.05"]["rto_keep_rate"] == 0.05
    assert "rto_keep_rate" not in report["recipes"]["derta"]  # the budget's: 1.0
    assert os.path.isfile(os.path.join(out, "base", "eval", "generations.jsonl"))
    assert not os.path.exists(os.path.join(out, "base", "hf"))  # the stand-in is used in place


def test_smoke_world_is_plain_english_and_prompts_use_the_chat_template(smoke_run, stand_in_base):
    from transformers import AutoTokenizer

    out, _ = smoke_run
    with open(os.path.join(out, "world", "world.json"), encoding="utf-8") as f:
        assert json.load(f)["style"] == "plain_english"
    tokenizer = AutoTokenizer.from_pretrained(stand_in_base)
    with open(os.path.join(out, "runs", "derta", "seed0", "eval", "generations.jsonl"),
              encoding="utf-8") as f:
        direct = [json.loads(line) for line in f if '"suite": "direct"' in line]
    assert direct
    for row in direct:
        expected = tokenizer.apply_chat_template([{"role": "user", "content": row["question"]}],
                                                 tokenize=False, add_generation_prompt=True)
        assert row["prompt"] == expected


def test_smoke_report_describes_the_lora_setup_not_pretraining(smoke_run):
    out, report = smoke_run
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        text = f.read()
    budget = rp.LORA_BUDGETS["smoke"]
    assert "SmolLM2-135M-Instruct" in text and f"rank {budget.lora_rank}" in text
    assert "(budget `smoke with tune_lr=0.0005, lora_alpha=4`)" in text
    assert "lr 0.0005" in text and "alpha 4" in text
    assert report["budget"]["attacks"]["include"] == ["safe_triggers"]
    # only the chosen attack is described; the others' plots are neither drawn nor linked
    assert "*safe_triggers*" in text and "Rank-assisted" not in text
    assert "Harmful fine-tuning" not in text
    for plot in reproduce.ATTACK_PLOTS:
        assert plot not in text and not os.path.exists(os.path.join(out, plot))
    assert report["results"]["derta"]["table"]["safe_triggers_refusal_rate"] is not None
    assert "pretrained" not in text and "pretraining here" in text
    with open(os.path.join(out, "timings.json"), encoding="utf-8") as f:
        timings = json.load(f)
    assert "pretrain" not in timings["phases_s"] and timings["phases_s"]["tune"] > 0


def test_budget_of_the_other_track_is_rejected(tmp_path, capsys):
    assert reproduce.main([f"--out={tmp_path / 'x'}", "--model=smollm2", "--budget=full",
                           "--compilation_cache="]) == 2
    assert "--model=smollm2 has budgets" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("flags, message", [
    (["--set", "lora_rank=8.5"], "--set lora_rank=8.5: lora_rank takes a whole number (now 4)"),
    (["--set", "bogus=1"], "--set bogus=1: not a settable field; the budget's are batch_size"),
    (["--set", "attacks.rank_k=x"], "--set attacks.rank_k=x: attacks.rank_k takes a whole "
                                    "number (now 5)"),
    (["--set", "model.lr=1"], "--set model.lr=1: FIELD is a budget field, world.FIELD or "
                              "attacks.FIELD"),
    (["--set", "world.refusals_open_with_rto_word=yes"],
     "--set world.refusals_open_with_rto_word=yes: world.refusals_open_with_rto_word takes "
     "true or false (now False)"),
    (["--set", "attacks.downstream_eval_rows=60"],
     "--set attacks.finetune_rows=8, attacks.downstream_eval_rows=60: the benign fine-tune "
     "needs 68 rows of the downstream task, the world has 64 (world.num_downstream)"),
])
def test_bad_budget_setting_is_one_error_naming_the_flag(tmp_path, capsys, flags, message):
    assert reproduce.main([f"--out={tmp_path / 'x'}", "--model=smollm2", "--budget=smoke",
                           "--compilation_cache=", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_budget_settings_reach_the_budget_the_world_and_the_attacks():
    budget = rp.LORA_BUDGETS["default"]
    changed = reproduce.with_settings(budget, [
        ("tune_steps", "10"), ("rto_keep_rate", "0.05"), ("attacks.finetune_rows", "8"),
        ("world.refusals_open_with_rto_word", "true"), ("world.num_eval_held_out", "5")])
    assert (changed.tune_steps, changed.rto_keep_rate) == (10, 0.05)
    assert changed.attacks.finetune_rows == 8 and changed.attacks.finetune_lr == 2e-4
    assert changed.world == {**budget.world, "refusals_open_with_rto_word": True,
                             "num_eval_held_out": 5}
    assert changed.name == ("default with tune_steps=10, rto_keep_rate=0.05, "
                            "attacks.finetune_rows=8, world.refusals_open_with_rto_word=true, "
                            "world.num_eval_held_out=5")
    assert reproduce.with_settings(budget, []) is budget


@pytest.mark.parametrize("flags, message", [
    (["--attacks=rank_prefill,jailbreak"], "--attacks='rank_prefill,jailbreak': choose from "
                                           "rank_prefill,direction,safe_triggers,finetune"),
    (["--set", "tune_lr"], "--set 'tune_lr': expected FIELD=VALUE"),
])
def test_bad_attack_or_setting_flag_exits_2(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        reproduce.main([f"--out={tmp_path / 'x'}", "--budget=smoke", *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_base_hf_dir_is_refused_for_the_tiny_track(tmp_path):
    with pytest.raises(ValueError, match="base_hf_dir is for the real-model track"):
        reproduce.reproduce(str(tmp_path / "x"), model="tiny", base_hf_dir=str(tmp_path))
    assert not os.path.exists(tmp_path / "x")


def test_smollm2_plots_draw_the_refused_share_and_replot_redraws_them(smoke_run, tmp_path,
                                                                      monkeypatch):
    """The world judge's `harmful` is a lower bound on this track: its curves are of the
    refused share; `--replot` draws the same files again from report.json alone."""
    import shutil

    from derta_jax.eval import plots

    out, report = smoke_run
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        text = f.read()
    assert "The prefill plots draw the refused share" in text
    assert "![Refused share against prefill depth](asr_vs_prefill.png)" in text
    copy = tmp_path / "study"
    os.makedirs(copy)
    shutil.copy(os.path.join(out, "report.json"), copy)
    assert reproduce.main([f"--out={copy}", "--replot"]) == 0
    drawn = sorted(name for name in os.listdir(copy) if name.endswith((".png", ".md")))
    assert drawn == sorted(name for name in os.listdir(out) if name.endswith((".png", ".md")))
    for name in drawn:  # the same report and pixels as the study's own
        with open(os.path.join(out, name), "rb") as f:
            assert (copy / name).read_bytes() == f.read(), name
    metrics = []
    real = plots.plot_prefill_curves
    monkeypatch.setattr(plots, "plot_prefill_curves", lambda *a, metric, **kw:
                        metrics.append(metric) or real(*a, metric=metric, **kw))
    reproduce.replot(str(copy))
    assert metrics and set(metrics) == {"refusal_rate"}
    assert reproduce.TRACKS["tiny"].plot_metric == "asr_harmful"  # the report's ASR


def test_replot_without_a_readable_report_is_refused(tmp_path, capsys):
    report = tmp_path / "report.json"
    assert reproduce.main([f"--out={tmp_path}", "--replot"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --replot: {report} does not exist (run the study first)")
    report.write_text('{"results": {}}')
    assert reproduce.main([f"--out={tmp_path}", "--replot"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --replot: {report}: field budget: missing (not a complete study report)")
    report.write_text('{"results": {}, "model": "gpt9"}')
    assert reproduce.main([f"--out={tmp_path}", "--replot"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --replot: {report}: field model: unknown track 'gpt9' (tiny, smollm2)")
    report.write_text('{"results": ')
    assert reproduce.main([f"--out={tmp_path}", "--replot"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --replot: {report}: not JSON (line 1") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # nothing drawn
