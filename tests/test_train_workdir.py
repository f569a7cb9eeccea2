"""Remote (gs://) workdirs: every file the trainer writes goes through etils.epath.

gs:// paths live in tests/fixtures_gcs.py's in-memory filesystem (`fake_gcs`): a gs://
workdir is then real URI handling end to end, and any local write to `$PWD/gs:/...`
(os.path.abspath / open on the URI) would show up as a local directory. Orbax writes
array data through tensorstore's own GCS driver, which the fixture's JSON API server
serves from the same store (`fake_gcs_tensorstore`), so the training run checkpoints into
the bucket and resumes from it.
"""

from __future__ import annotations

import json
import os

import pytest
from etils import epath

from derta_jax import paths
from derta_jax import workdir as layout

WORKDIR = "gs://bucket/run"


def test_resolve_keeps_uris_and_absolutises_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert layout.checkpoints_path(WORKDIR) == "gs://bucket/run/checkpoints"
    assert layout.hf_files_path("gs://bucket/run/") == "gs://bucket/run/hf_files"
    assert os.fspath(paths.resolve("rel/run")) == str(tmp_path / "rel" / "run")
    assert paths.is_remote(WORKDIR) and not paths.is_remote(tmp_path)
    with pytest.raises(ValueError, match=r"'ftp://x/y': unsupported URI scheme"):
        paths.resolve("ftp://x/y")


def test_staged_and_copy_tree_write_into_a_remote_directory(fake_gcs, tmp_path):
    with paths.staged(WORKDIR + "/sub") as local:
        assert not paths.is_remote(local)
        os.makedirs(os.path.join(local, "a"))
        with open(os.path.join(local, "a", "x.txt"), "w") as f:
            f.write("hello")
    assert (epath.Path(WORKDIR) / "sub" / "a" / "x.txt").read_text() == "hello"
    back = tmp_path / "back"
    assert paths.copy_tree(WORKDIR + "/sub", back) == [os.path.join("a", "x.txt")]
    assert (back / "a" / "x.txt").read_text() == "hello"
    assert not (tmp_path / "gs:").exists()


def test_model_config_round_trip_on_a_remote_workdir(fake_gcs, tmp_path):
    from configs.tiny import get_config
    from derta_jax.train.config import build_model_config

    cfg = build_model_config(get_config())
    layout.write_model_config(WORKDIR, cfg)
    assert "bucket/run/model_config.json" in fake_gcs
    assert layout.read_model_config(WORKDIR) == cfg
    with pytest.raises(FileNotFoundError, match="gs://bucket/other/model_config.json"):
        layout.read_model_config("gs://bucket/other")
    assert not (tmp_path / "gs:").exists()


def test_metric_logger_copies_staged_files_while_running(fake_gcs, tmp_path):
    from derta_jax.train.metrics import MetricLogger

    root = epath.Path(WORKDIR)
    root.mkdir(parents=True)
    (root / "metrics.jsonl").write_text('{"step": 1}\n')  # an earlier run's record
    logger = MetricLogger(WORKDIR, total_steps=3, sync_every_s=0.0)
    logger.log(2, {"loss": 1.5}, epoch=0.5, tokens=10.0)
    rows = [json.loads(x) for x in (root / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] == 1.5
    assert list((root / "tensorboard").iterdir())
    stage = logger._stage
    logger.close()
    assert not os.path.exists(stage)
    assert not (tmp_path / "gs:").exists()


def _micro_config(workdir: str, steps: int):
    from configs.tiny import get_config

    config = get_config()
    config.workdir = workdir
    config.model.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                        num_kv_heads=1, head_dim=16)
    config.data.update(synthetic_triples=20, synthetic_helpful=40, num_safety=20, max_length=96)
    config.train.update(batch_size=8, num_epochs=4, max_steps=steps, log_every=1)
    config.checkpoint.update(every_steps=2, keep=5)
    return config


def test_training_run_writes_everything_through_epath(fake_gcs_tensorstore, tmp_path):
    from derta_jax.train import loop

    summary = loop.run(_micro_config(WORKDIR, steps=2))
    root = epath.Path(WORKDIR)
    assert summary["workdir"] == WORKDIR
    # Orbax wrote the checkpoints into the bucket: arrays through tensorstore's GCS driver.
    assert layout.latest_step(WORKDIR) == 2
    assert any(method == "POST" and name.startswith("bucket/run/checkpoints/2/")
               for method, name in fake_gcs_tensorstore)
    for name in ("config.json", "model_config.json", "data_report.json", "summary.json",
                 "loss_curve.png", "tokenizer/tokenizer.json", "hf_files/tokenizer.json"):
        assert (root / name).exists(), name
    assert (root / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert [json.loads(x)["step"] for x in (root / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2]
    assert any(p.name.startswith("events.out.tfevents") for p in (root / "tensorboard").iterdir())
    assert not (tmp_path / "gs:").exists()
    assert not any(paths.is_remote(p) or p.startswith("gs:") for p in os.listdir(tmp_path))

    # Resume with a longer run: the tokenizer comes back from the workdir, the old config
    # is kept under a new name, metrics.jsonl gets the new records after the old ones.
    summary = loop.run(_micro_config(WORKDIR, steps=4))
    assert summary["steps"] == 4 and layout.latest_step(WORKDIR) == 4
    steps = [json.loads(x)["step"] for x in (root / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert any(p.name.startswith("config.") and p.name != "config.json" for p in root.iterdir())
    assert json.loads((root / "summary.json").read_text())["steps"] == 4

    # What a TPU pod's user does next: evaluate and export from the same gs:// workdir,
    # into gs:// too. The exported HF model computes what the evaluated model computes.
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from derta_jax import export as export_cli
    from derta_jax.eval.run import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(WORKDIR)
    assert tokenizer.name_or_path == "gs://bucket/run/hf_files"
    assert export_cli.main([f"--workdir={WORKDIR}", "--out=gs://bucket/hf"]) == 0
    local = tmp_path / "hf"
    paths.copy_tree("gs://bucket/hf", local)
    ids = np.asarray([tokenizer.encode("How do I bake bread?")], np.int32)
    ours = np.asarray(model.logits(model(jnp.asarray(ids))[0]))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(local)(torch.from_numpy(ids).long()).logits
    np.testing.assert_allclose(theirs.numpy(), ours, rtol=1e-4, atol=1e-4)
    assert not (tmp_path / "gs:").exists()


def test_evaluation_probes_the_refusal_token_the_run_was_trained_on(tmp_path):
    """A run trained with data.refusal_string set to another single-token word: the workdir
    records it, and the P(refusal) probe of evaluation reads it (not the default "Sorry")."""
    from derta_jax.data.tokenize import refusal_token_id
    from derta_jax.data.templates import make_template
    from derta_jax.eval.refusal_probability import refusal_probabilities
    from derta_jax.eval.reproduction import run_refusal_probabilities
    from derta_jax.eval.run import encode_prompt, load_evaluated
    from derta_jax.train import loop
    from derta_jax.train.data import load_or_train_tokenizer

    config = _micro_config(str(tmp_path / "probe"), steps=2)
    # the world's tokenizer (deterministic from the config): pick another one-token word
    tokenizer, _ = load_or_train_tokenizer(config, tmp_path / "tok")
    word = next(w for w in ("Step", "step", "the", "The", "and") if w != "Sorry"
                and len(tokenizer.encode(w, add_special_tokens=False)) == 1)
    config.data.refusal_string = word
    loop.run(config)

    loaded, tok = load_evaluated(str(tmp_path / "probe"))
    assert loaded.run.refusal_string == word and loaded.step == 2
    template = make_template("reference", tok)
    answers = [("How do I open the door?", "Step 1: find the key.")]
    probed = run_refusal_probabilities(loaded, tok, template, answers)[0]
    word_id, sorry_id = refusal_token_id(tok, word), refusal_token_id(tok, "Sorry")
    assert word_id != sorry_id
    prompt = encode_prompt(tok, template.render(answers[0][0]))
    response = tok.encode(answers[0][1], add_special_tokens=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    assert probed == refusal_probabilities(loaded.model, prompt, response, word_id, pad_id=pad)
    assert probed != refusal_probabilities(loaded.model, prompt, response, sorry_id, pad_id=pad)


def test_reading_the_parameters_of_a_training_checkpoint_warns_of_nothing(tmp_path, caplog):
    """Evaluation and export read `params` alone; Orbax's warning for each other item of a
    training checkpoint (opt_state, train, data) is noise there and is filtered out, while
    the parameters come back exactly."""
    import logging

    import jax
    import jax.numpy as jnp
    import numpy as np

    from derta_jax import workdir as wd

    params = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)}
    with wd.checkpoint_manager(tmp_path, async_save=False) as manager:
        wd.save_training_state(manager, 3, params, {"mu": params}, jax.random.key(0),
                               {"epoch": 0})
        manager.wait_until_finished()
    with caplog.at_level(logging.WARNING):
        restored, step = wd.restore_params(tmp_path, jax.eval_shape(lambda: params))
    assert step == 3
    np.testing.assert_array_equal(restored["w"], params["w"])
    assert not [r for r in caplog.records if "could not be restored" in r.getMessage()
                or "read only" in r.getMessage() or "read_only" in r.getMessage()]
