"""Training straight from a Hugging Face directory (`--config.model.hf_dir`).

The trainer's first logged loss must equal the token-mean cross-entropy that transformers'
PyTorch model, with the same weights, gives on the same first batch: this pins the weight
loading, the chat-template data path, the batch layout and the pooled DeRTa normalisation
(MLE and RTO tokens in one mean) in one number.
"""

import json
import pathlib
import re

import numpy as np
import pytest

import torch

from tests.xla_env import xla_flags


def _hf_model_dir(tmp_path, tokenizer, vocab_size=None, hidden_size=48, head_dim=16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=512,
                         rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    directory = tmp_path / "hf"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model


def test_first_loss_equals_pytorch_cross_entropy_on_the_same_batch(tmp_path, small_tokenizer):
    from configs.tiny import get_config
    from derta_jax.data import synthetic
    from derta_jax.train.data import build_training_data
    from derta_jax.train.loop import run

    hf_dir, hf_model = _hf_model_dir(tmp_path, small_tokenizer)
    synthetic.write_world(tmp_path / "world", seed=0, num_triples=12, num_helpful=24,
                          num_pretrain=40, num_eval_harmful=1, num_eval_benign=5,
                          num_over_refusal=2)
    config = get_config()
    config.workdir = str(tmp_path / "run")
    config.model.hf_dir = str(hf_dir)
    config.data.update(synthetic=False, triples=str(tmp_path / "world" / "triples.jsonl"),
                       helpful=str(tmp_path / "world" / "helpful.jsonl"), recipe="derta",
                       num_safety=12, template="chat", max_length=192, packing=False)
    config.train.update(batch_size=8, max_steps=1, num_epochs=1, log_every=1)
    config.checkpoint.every_steps = 1
    run(config)

    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    batch = next(build_training_data(config, config.workdir, process_index=0,
                                     process_count=1).pipeline.iterator())
    assert batch["rto_mask"].any() and (batch["loss_mask"] & ~batch["rto_mask"]).any()
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                          attention_mask=torch.tensor(batch["segment_ids"] > 0, dtype=torch.long),
                          position_ids=torch.tensor(batch["positions"], dtype=torch.long)).logits
    logp = torch.log_softmax(logits.double(), dim=-1).numpy()
    nll = -np.take_along_axis(logp, batch["targets"][..., None].astype(np.int64), -1)[..., 0]
    expected = nll[batch["loss_mask"]].mean()
    assert logged["loss"] == pytest.approx(expected, rel=1e-4)
    rto = batch["rto_mask"]
    assert logged["rto_loss"] == pytest.approx(nll[rto].mean(), rel=1e-4)
    assert logged["mle_tokens"] == int((batch["loss_mask"] & ~rto).sum())


def _world_config(tmp_path, workdir):
    from configs.tiny import get_config
    from derta_jax.data import synthetic

    if not (tmp_path / "world").is_dir():
        synthetic.write_world(tmp_path / "world", seed=0, num_triples=12, num_helpful=24,
                              num_pretrain=40, num_eval_harmful=1, num_eval_benign=5,
                              num_over_refusal=2)
    config = get_config()
    config.workdir = str(workdir)
    config.data.update(synthetic=False, triples=str(tmp_path / "world" / "triples.jsonl"),
                       helpful=str(tmp_path / "world" / "helpful.jsonl"), recipe="derta",
                       num_safety=12, template="chat", max_length=192, packing=False)
    config.train.update(batch_size=8, max_steps=2, num_epochs=1, log_every=1)
    config.checkpoint.every_steps = 2
    config.model.scan_layers = True
    return config


def _losses(workdir):
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_init_from_a_converted_workdir_in_a_bucket(tmp_path, small_tokenizer,
                                                   fake_gcs_tensorstore):
    """convert once into gs://: the parameters restored from the bucket (Orbax, through
    tensorstore) are the HF directory's, bit for bit; a LoRA run starts its frozen base from
    there (model.init_from=WORKDIR/checkpoints/N) and records that base for export/evaluate.
    (Full fine-tuning from a bucket workdir, with its losses: the two-process test below.)"""
    import jax

    from derta_jax import convert, paths, weights, workdir
    from derta_jax.train.loop import run

    hf_dir, _ = _hf_model_dir(tmp_path, small_tokenizer)
    convert.convert(str(hf_dir), str(tmp_path / "converted"), scan_layers=True)
    paths.copy_tree(tmp_path / "converted", "gs://bucket/models/tiny")
    restored, step = weights.restore_full_params("gs://bucket/models/tiny")
    direct = weights.load_hf_params(str(hf_dir),
                                    workdir.read_model_config(tmp_path / "converted"))
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, restored, direct)
    assert any(name.startswith("bucket/models/tiny/checkpoints/0/")
               for _, name in fake_gcs_tensorstore)

    lora = _world_config(tmp_path, tmp_path / "lora")
    lora.model.init_from = "gs://bucket/models/tiny/checkpoints/0"
    lora.lora.update(enabled=True, rank=2, dropout=0.0)
    lora.train.max_steps = 1
    lora.checkpoint.every_steps = 1
    run(lora)
    record = json.loads((tmp_path / "lora" / "lora.json").read_text())
    assert record["base"]["workdir"] == "gs://bucket/models/tiny" and record["base"]["step"] == 0


@pytest.mark.parametrize("change, message", [
    ({"init_from": "MISSING"}, "model.init_from='{root}/missing': "),
    ({"init_from": "CONVERTED", "scan_layers": False},
     "stores layers stacked but model.scan_layers=False"),
    ({"init_from": "CONVERTED", "hf_dir": "HF"}, "set it or model.hf_dir, not both"),
])
def test_init_from_errors_are_one_line_config_errors(tmp_path, small_tokenizer, change, message):
    from derta_jax import convert
    from derta_jax.train.config import ConfigError
    from derta_jax.train.loop import run

    hf_dir, _ = _hf_model_dir(tmp_path, small_tokenizer)
    convert.convert(str(hf_dir), str(tmp_path / "converted"), scan_layers=True)
    names = {"MISSING": str(tmp_path / "missing"), "CONVERTED": str(tmp_path / "converted"),
             "HF": str(hf_dir)}
    config = _world_config(tmp_path, tmp_path / "run")
    config.model.update({k: names.get(v, v) for k, v in change.items()})
    with pytest.raises(ConfigError, match=re.escape(message.format(root=tmp_path))):
        run(config)
    assert not (tmp_path / "run").exists()  # nothing written


RECIPE = '''
from configs.tiny import get_config as _tiny


def get_config():
    c = _tiny()
    c.data.update(synthetic=False, triples="{world}/triples.jsonl",
                  helpful="{world}/helpful.jsonl", recipe="derta", num_safety=12,
                  template="chat", max_length=192, packing=False)
    c.train.update(batch_size=8, max_steps=2, num_epochs=1, log_every=1)
    c.checkpoint.every_steps = 2
    c.model.scan_layers = True
    c.mesh.fsdp = -1
    return c
'''


def _bytes_read(ranges, part: str) -> dict:
    """{object: sorted disjoint (first, end) byte intervals served} over the objects whose
    name holds `part`."""
    read: dict = {}
    for name, first, end in sorted(ranges):
        if part in name and end > first:
            spans = read.setdefault(name, [])
            if spans and first <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], end))
            else:
                spans.append((first, end))
    return read


def _overlap(a: list, b: list) -> int:
    """Bytes in both of two sorted disjoint interval lists."""
    return sum(max(0, min(e1, e2) - max(f1, f2)) for f1, e1 in a for f2, e2 in b)


def test_two_processes_start_from_a_bucket_workdir(tmp_path, small_tokenizer):
    """A pod's start from a converted workdir in a bucket (model.init_from=gs://...): each of
    2 processes x 4 devices restores from the bucket through Orbax onto its own shards, and
    they train with the losses of a one-process start from the same workdir on local disk.

    Bytes: convert stores each array in 8 chunks along embed, the dimension fsdp splits
    (saved whole, an array is one chunk and every process reads all of it), so the two
    processes' reads of the bucket are disjoint but for the small arrays that tensorstore
    reads in one go and the replicated norm scales."""
    import os
    import shutil
    import socket
    import subprocess
    import sys

    from derta_jax import convert
    from derta_jax.data import synthetic
    from derta_jax.train.loop import run
    from tests.fixtures_gcs import directory_bucket_server

    # vocab 32,000: half an embedding (3 MB, ~2.4 MB compressed) is well over the gap up to
    # which tensorstore merges the reads of one process (1 MB; at 16,000 one run in the
    # full suite merged across the other process's half)
    hf_dir, _ = _hf_model_dir(tmp_path, small_tokenizer, vocab_size=32000)
    convert.convert(str(hf_dir), str(tmp_path / "converted"), scan_layers=True, shards=8)
    root = tmp_path / "gcs"
    shutil.copytree(tmp_path / "converted", root / "bucket" / "models" / "tiny")
    synthetic.write_world(tmp_path / "world", seed=0, num_triples=12, num_helpful=24,
                          num_pretrain=40, num_eval_harmful=1, num_eval_benign=5,
                          num_over_refusal=2)
    recipe = tmp_path / "recipe.py"
    recipe.write_text(RECIPE.format(world=tmp_path / "world"))

    namespace: dict = {}
    exec(compile(recipe.read_text(), str(recipe), "exec"), namespace)
    local = namespace["get_config"]()
    local.workdir = str(tmp_path / "local")
    local.model.init_from = str(tmp_path / "converted")
    run(local)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = pathlib.Path(__file__).resolve().parents[1]
    with directory_bucket_server(root) as (url0, api0), directory_bucket_server(root) as (url1, api1):
        procs = []
        for index, url in enumerate((url0, url1)):
            env = {**os.environ, "XLA_FLAGS": xla_flags(4),
                   "JAX_PLATFORMS": "cpu", "DERTA_TEST_BUCKET_ROOT": str(root),
                   "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
                   "PYTHONPATH": str(repo)}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.gcs_worker", f"--config={recipe}",
                 f"--config.workdir={tmp_path / 'pod'}",
                 "--config.model.init_from=gs://bucket/models/tiny",
                 "--config.distributed.initialize=always",
                 f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                 "--config.distributed.num_processes=2",
                 f"--config.distributed.process_id={index}"],
                cwd=str(repo), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True))
        try:
            outputs = [p.communicate(timeout=600)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p, out in zip(procs, outputs):
            assert p.returncode == 0, out[-3000:]
        read = [_bytes_read(api.served_ranges, "/checkpoints/0/params/") for api in (api0, api1)]
    stored = sum(f.stat().st_size for f in (tmp_path / "converted" / "checkpoints" / "0" /
                                            "params").rglob("*") if f.is_file())
    both = sum(_overlap(read[0][name], read[1].get(name, [])) for name in read[0])
    each = [sum(end - first for spans in r.values() for first, end in spans) for r in read]
    print("bytes read per process", each, "in common", both, "stored", stored)
    # one chunk per array (the old layout) reads 100% per process, 100% in common. Measured
    # with chunks: run alone 57% / 50% per process, 7% in common; in the full suite on 2
    # loaded cores 69% / 57%, 26% in common: tensorstore merges the pending reads of one
    # file whose gaps are under 1 MB, and more reads are pending when the server is slow
    assert all(0.2 * stored < n < 0.9 * stored for n in each), (each, both, stored)
    assert both < 0.5 * stored, (both, each, stored)
    assert _losses(tmp_path / "pod") == pytest.approx(_losses(tmp_path / "local"), rel=1e-5)
