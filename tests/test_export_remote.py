"""Export and evaluate from a gs:// workdir, and export into a gs:// directory.

A tiny Llama (transformers' own classes, the small BPE tokenizer) is converted into a
local workdir, and a LoRA workdir is built next to it (lora.json + adapters only). Each is
copied byte for byte, checkpoints included, into the in-memory bucket of
tests/fixtures_gcs.py. Nothing is redirected: epath reads the workdir files through the
fake `gcs` fsspec filesystem, Orbax lists the steps and reads checkpoint metadata the same
way, and tensorstore's GCS driver reads the array data from the same store through the
fake's JSON API server. Any local `gs:` directory left in the working directory fails
the test.

The reference everywhere is the same command on the local workdir: the files exported
from (and to) gs:// must be byte-identical to it.
"""

from __future__ import annotations

import re
import shutil

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx

from derta_jax import export as export_cli
from derta_jax import paths, weights
from derta_jax import workdir as layout
from derta_jax.models import lora

SETTINGS = lora.LoraSettings(rank=2, alpha=4.0)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory, small_tokenizer):
    """{"hf": HF dir, "wd": converted workdir, "lora": LoRA workdir} (local paths)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from derta_jax.convert import convert

    root = tmp_path_factory.mktemp("remote_export")
    config = LlamaConfig(vocab_size=len(small_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=128, tie_word_embeddings=False,
                         bos_token_id=small_tokenizer.bos_token_id,
                         eos_token_id=small_tokenizer.eos_token_id,
                         pad_token_id=small_tokenizer.pad_token_id, initializer_range=0.3)
    torch.manual_seed(0)
    hf = root / "hf"
    LlamaForCausalLM(config).save_pretrained(hf, safe_serialization=True)
    small_tokenizer.save_pretrained(hf)
    wd = root / "wd"
    convert(str(hf), str(wd))

    lora_wd = root / "lora"
    model_config = layout.read_model_config(wd)
    layout.write_model_config(lora_wd, model_config)
    shutil.copytree(wd / layout.HF_FILES_DIR, lora_wd / layout.HF_FILES_DIR)
    layout.write_lora_record(str(lora_wd), SETTINGS, base={"hf_dir": str(hf)}, seed=0)
    adapters = weights.init_adapters(model_config, SETTINGS, seed=0)
    # B starts at zero; move it so that the merged weights differ from the base.
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)
    layout.save_params(str(lora_wd), 3, adapters)
    return {"hf": hf, "wd": wd, "lora": lora_wd}


@pytest.fixture
def bucket(fake_gcs_tensorstore, monkeypatch, workdirs, tmp_path):
    """gs://bucket/wd and gs://bucket/lora hold byte copies of the local workdirs, their
    checkpoints included; returns the checkpoint paths Orbax was asked to open (read-only)."""
    for name in ("wd", "lora"):
        paths.copy_tree(workdirs[name], f"gs://bucket/{name}")
    asked = []
    real_manager = layout.checkpoint_manager

    def manager(workdir, **options):
        asked.append(layout.checkpoints_path(workdir))
        assert options.get("read_only"), f"{asked[-1]}: export/evaluate must not write checkpoints"
        return real_manager(workdir, **options)

    monkeypatch.setattr(layout, "checkpoint_manager", manager)
    yield asked
    assert not (tmp_path / "gs:").exists()  # nothing wrote the URI as a local path


def _files(directory) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `directory` (local or gs://)."""
    files = {}
    for path in epath.Path(directory).iterdir():
        if path.is_dir():
            files.update({f"{path.name}/{k}": v for k, v in _files(path).items()})
        else:
            files[path.name] = path.read_bytes()
    return files


def test_export_from_a_remote_workdir_is_the_local_export(bucket, fake_gcs_tensorstore,
                                                          workdirs, tmp_path):
    local = export_cli.export(workdirs["wd"], tmp_path / "local", max_shard_size="20KB")
    assert not fake_gcs_tensorstore
    remote = export_cli.export("gs://bucket/wd", tmp_path / "from_gs", max_shard_size="20KB")
    assert remote == local and "model.safetensors.index.json" in local
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(local)
    assert _files(tmp_path / "from_gs") == _files(tmp_path / "local")
    assert "gs://bucket/wd/checkpoints" in bucket
    # The arrays came from the bucket through tensorstore, which wrote nothing there.
    assert any(method == "GET" and name.startswith("bucket/wd/checkpoints/0/params/")
               for method, name in fake_gcs_tensorstore)
    assert {method for method, _ in fake_gcs_tensorstore} == {"GET"}
    # --tokenizer_dir may be remote too.
    export_cli.export(workdirs["wd"], tmp_path / "tok", max_shard_size="20KB",
                      tokenizer_dir="gs://bucket/wd/hf_files")
    assert _files(tmp_path / "tok") == _files(tmp_path / "local")

    with pytest.raises(FileNotFoundError, match="gs://bucket/nowhere/model_config.json: missing"):
        export_cli.export("gs://bucket/nowhere", tmp_path / "x")
    with pytest.raises(NotImplementedError, match="gs://bucket/wd/lora.json is missing"):
        export_cli.export("gs://bucket/wd", tmp_path / "y", lora="adapter")


def test_export_into_a_remote_directory_follows_the_local_overwrite_rule(bucket, workdirs,
                                                                       tmp_path):
    """The same sequence of exports into a local and a gs:// directory leaves the same files."""
    out_local, out_remote = tmp_path / "out", "gs://bucket/out"
    for out in (out_local, out_remote):
        assert export_cli.main([f"--workdir={workdirs['wd']}", f"--out={out}",
                                "--max_shard_size=20KB"]) == 0
    assert any(name.startswith("model-00001-of-") for name in _files(out_remote))
    assert _files(out_remote) == _files(out_local)

    for out in (out_local, out_remote):
        before = _files(out)
        with pytest.raises(FileExistsError, match=re.escape(f"{out} exists and is not empty")):
            export_cli.main(["--workdir=gs://bucket/wd", f"--out={out}"])
        assert _files(out) == before
        (epath.Path(out) / "README.md").write_text("kept\n")
        # One shard now: the earlier shards and index go, unrelated files stay.
        export_cli.main(["--workdir=gs://bucket/wd", f"--out={out}", "--overwrite",
                         "--dtype=bfloat16"])
    remote = _files(out_remote)
    assert remote == _files(out_local)
    assert "model.safetensors" in remote and remote["README.md"] == b"kept\n"
    assert not any(name.startswith("model-0") or name.endswith(".index.json") for name in remote)

    # A failed export writes nothing; an output that is a file is refused.
    with pytest.raises(FileNotFoundError, match=r"gs://bucket/wd/checkpoints: no step 99"):
        export_cli.export("gs://bucket/wd", "gs://bucket/failed", step=99)
    assert not epath.Path("gs://bucket/failed").exists()
    epath.Path("gs://bucket/file").write_text("x")
    with pytest.raises(FileExistsError, match="gs://bucket/file exists and is not a directory"):
        export_cli.export("gs://bucket/wd", "gs://bucket/file")


def test_lora_record_and_export_through_gs(bucket, workdirs, tmp_path):
    record = layout.read_lora_record("gs://bucket/lora")
    assert record == layout.read_lora_record(str(workdirs["lora"]))
    assert record["settings"] == SETTINGS and record["base"] == {"hf_dir": str(workdirs["hf"])}
    for mode in ("adapter", "merge"):
        local = export_cli.export(workdirs["lora"], tmp_path / f"{mode}_local", lora=mode)
        remote = export_cli.export("gs://bucket/lora", f"gs://bucket/{mode}", lora=mode)
        assert remote == local
        assert _files(f"gs://bucket/{mode}") == _files(tmp_path / f"{mode}_local")
    assert "adapter_model.safetensors" in _files("gs://bucket/adapter")
    base = _files(workdirs["hf"])["model.safetensors"]
    assert _files("gs://bucket/merge")["model.safetensors"] != base  # the adapters are in
    assert "gs://bucket/lora/checkpoints" in bucket

    # lora.json into gs://: local base dirs made absolute, URIs kept as they are.
    from derta_jax.train.config import default_config
    from derta_jax.train.state import base_record

    model_config = layout.read_model_config(workdirs["wd"])
    config = default_config()
    config.model.hf_dir = "rel/base"
    base = base_record(config, model_config)
    assert base == {"hf_dir": str(tmp_path / "rel/base"),
                    "model_config_sha256": layout.model_config_hash(model_config)}
    path = layout.write_lora_record("gs://bucket/new", SETTINGS, base=base, seed=1)
    assert path == "gs://bucket/new/lora.json"
    assert layout.read_lora_record("gs://bucket/new")["base"] == base
    config.model.hf_dir = "gs://bucket/base"
    assert base_record(config, model_config)["hf_dir"] == "gs://bucket/base"
    with pytest.raises(ValueError, match=r"base.hf_dir=gs://bucket/base: a remote HF "
                                         r"directory; copy it"):
        export_cli.export("gs://bucket/lora", tmp_path / "z", base_hf_dir="gs://bucket/base")
    epath.Path("gs://bucket/new/lora.json").write_text("{rank: 2")
    with pytest.raises(ValueError, match=r"gs://bucket/new/lora.json: line 1: not JSON"):
        layout.read_lora_record("gs://bucket/new")


def test_evaluate_loads_a_remote_workdir_like_the_local_one(bucket, workdirs):
    from derta_jax.eval.run import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("gs://bucket/wd")
    local_model, local_tokenizer = load_model_and_tokenizer(str(workdirs["wd"]))
    left = jax.tree.leaves(nnx.state(model, nnx.Param))
    right = jax.tree.leaves(nnx.state(local_model, nnx.Param))
    assert len(left) == len(right) > 0
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(left, right))
    text = "Sorry, I can't help with that."
    assert tokenizer.encode(text) == local_tokenizer.encode(text)
    assert tokenizer.chat_template == local_tokenizer.chat_template
    assert tokenizer.name_or_path == "gs://bucket/wd/hf_files"
    assert bucket == ["gs://bucket/wd/checkpoints"] * 2 + [
        layout.checkpoints_path(workdirs["wd"])] * 2  # latest_step, then restore_params

    with pytest.raises(FileNotFoundError, match=r"--model=gs://bucket/hf: no model_config.json "
                                                r"there; a remote --model must be a derta_jax"):
        load_model_and_tokenizer("gs://bucket/hf")
