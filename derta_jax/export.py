"""Export a derta_jax workdir's checkpoint as a Hugging Face model directory.

    python -m derta_jax.export --workdir=WORKDIR [--step=N] --out=HF_DIR [--dtype=bfloat16]
                               [--max_shard_size=5GB] [--lora=merge|adapter]
                               [--base_hf_dir=DIR] [--overwrite]

Why: the trained model must leave the project in the form everyone else loads,
`AutoModelForCausalLM.from_pretrained(HF_DIR)`, with its tokenizer and chat template.
Writes sharded safetensors (+ index when more than one shard), `config.json` (rope
settings in both the transformers-5 and the older form; fields of the source model's
config.json that the ModelConfig does not hold are kept), `generation_config.json`
(the source model's when the workdir has one) and the tokenizer files kept in
WORKDIR/hf_files/. Tensors stream from the restored parameters through the name table
into shards; at most one shard is held on the host at a time.

WORKDIR (and --out, --tokenizer_dir) may be URIs such as gs://bucket/run, as written by a
TPU pod's training: every workdir file is read through etils.epath, the checkpoint through
Orbax; a remote --out is written into a local temporary directory (so the local disk must
hold the whole exported model), then copied (the same non-empty/--overwrite rule is
checked on --out before anything is written).

LoRA runs (WORKDIR/lora.json, written by the trainer with lora.enabled=True) checkpoint
only their adapters. Their export needs the frozen base: the HF directory the run started
from (recorded in lora.json; `--base_hf_dir` points elsewhere, e.g. after a move), or, for
runs without one, the base re-initialised from the recorded seed. `--lora=merge` (the
default) streams the base tensor by tensor and writes W + (alpha/r) A B in place of every
adapted weight (derta_jax.hf.peft.merged_hf_tensors): a normal HF model directory.
`--lora=adapter` writes PEFT's `adapter_model.safetensors` + `adapter_config.json`
(+ tokenizer files), for `PeftModel.from_pretrained(base, OUT)` on top of the base model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from typing import Iterator, Optional, Sequence

import numpy as np
from etils import epath
from flax import nnx

from derta_jax import paths, weights
from derta_jax import workdir as wd
from derta_jax.hf import peft
from derta_jax.hf.config import hf_config_with_source, hf_generation_config
from derta_jax.hf.mapping import export_hf_tensors
from derta_jax.hf.safetensors_io import (INDEX_FILE, SHARD_PATTERN, SINGLE_FILE, as_numpy_dtype,
                                         iter_checkpoint, write_safetensors_sharded)
from derta_jax.hf.tokenizer_files import GENERATION_CONFIG, copy_tokenizer_files

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
LORA_CHOICES = ("merge", "adapter")


def _model_state(config, params: dict) -> nnx.State:
    state = weights.abstract_params(config)
    nnx.replace_by_pure_dict(state, params)
    return state


def _cast(tensors, dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    for name, array in tensors:
        array = np.asarray(array)
        yield name, array if array.dtype == dtype else array.astype(dtype)


def export(workdir: str, out: str, step: Optional[int] = None, dtype: Optional[str] = None,
           max_shard_size: str = "5GB", lora: str = "merge", overwrite: bool = False,
           tokenizer_dir: Optional[str] = None, base_hf_dir: Optional[str] = None) -> list[str]:
    """Writes the HF directory; returns the names of the files written.

    `workdir`, `out` and `tokenizer_dir` may be URIs (gs://...): the workdir is read through
    etils.epath and Orbax; a remote `out` is written locally first, then copied."""
    if lora not in LORA_CHOICES:
        raise ValueError(f"--lora={lora!r}: must be one of {LORA_CHOICES}")
    if dtype is not None and dtype not in DTYPE_CHOICES:
        raise ValueError(f"--dtype={dtype!r}: must be one of {DTYPE_CHOICES}")
    config = wd.read_model_config(workdir)
    record = wd.read_lora_record(workdir)
    step = wd.resolve_step(workdir, step)
    if record is None and lora == "adapter":
        raise NotImplementedError(
            f"{workdir} step {step} holds no LoRA adapters: --lora=adapter export needs the "
            f"LoRA trainer's workdir ({paths.resolve(workdir) / wd.LORA_RECORD_FILE} is missing)")
    with _output_dir(out, overwrite) as local_out:
        if record is not None:
            return _export_lora_run(workdir, local_out, config, record, step, dtype,
                                    max_shard_size, lora, tokenizer_dir, base_hf_dir)
        params, step = weights.restore_full_params(workdir, config, step)
        out_dtype = dtype or config.param_dtype
        written = write_safetensors_sharded(
            _cast(export_hf_tensors(_model_state(config, params), config),
                  as_numpy_dtype(out_dtype)), local_out, max_shard_size, overwrite=True)
        return written + _write_model_files(workdir, local_out, config, out_dtype, tokenizer_dir)


def _is_weight_file(name: str) -> bool:
    return name in (SINGLE_FILE, INDEX_FILE) or bool(SHARD_PATTERN.fullmatch(name))


@contextlib.contextmanager
def _output_dir(out: str, overwrite: bool) -> Iterator[str]:
    """The local directory the export writes into.

    Local `out`: itself, prepared as before (created; refused when non-empty unless
    `overwrite`). Remote `out`: the same rule checked there first, then a temporary local
    directory whose files are copied into `out` once the export has succeeded (a failed
    export leaves `out` untouched). Like write_safetensors_sharded does locally, weight
    files of an earlier export that the new one does not rewrite are deleted, so a
    different shard count never leaves a mixed model behind."""
    if not paths.is_remote(out):
        paths.prepare_output_dir(os.fspath(out), overwrite)
        yield os.fspath(out)
        return
    target = paths.resolve(out)
    paths.check_output_dir(target, overwrite)
    with tempfile.TemporaryDirectory(prefix="derta_jax_export_") as local:
        yield local
        names = set(os.listdir(local))
        if target.is_dir() and any(_is_weight_file(n) for n in names):
            for old in target.iterdir():
                if _is_weight_file(old.name) and old.name not in names:
                    old.unlink()
        paths.copy_tree(local, target)


def _write_model_files(workdir: str, out: str, config, out_dtype: str,
                       tokenizer_dir: Optional[str], base_hf_dir: Optional[str] = None) -> list[str]:
    """config.json, generation_config.json and the tokenizer files next to the weights
    (`out` is local; the workdir and `tokenizer_dir` may be remote).

    The source model's config.json (whose extra fields are kept) is WORKDIR/hf_files'
    copy, else that of the base model directory a LoRA run started from."""
    written: list[str] = []
    source_config = None
    source_config_path = epath.Path(wd.hf_files_path(workdir)) / wd.SOURCE_CONFIG_FILE
    if not source_config_path.is_file() and base_hf_dir:
        source_config_path = paths.resolve(base_hf_dir) / "config.json"
    if source_config_path.is_file():
        source_config = json.loads(source_config_path.read_text(encoding="utf-8"))
    written += _write_json(out, "config.json",
                           hf_config_with_source(config, source_config, dtype=out_dtype))
    source = paths.resolve(tokenizer_dir) if tokenizer_dir else epath.Path(wd.hf_files_path(workdir))
    if (source / GENERATION_CONFIG).is_file():
        (source / GENERATION_CONFIG).copy(epath.Path(out) / GENERATION_CONFIG, overwrite=True)
        written.append(GENERATION_CONFIG)
    else:
        written += _write_json(out, GENERATION_CONFIG, hf_generation_config(config))
    written += _copy_tokenizer(source, out)
    return written


def _copy_tokenizer(source: epath.Path, out: str) -> list[str]:
    """The tokenizer files of `source` (local or remote; nothing when it is absent)."""
    if not source.is_dir():
        return []
    with paths.fetched(source) as local:
        return copy_tokenizer_files(local, out, overwrite=True)


def _base_tensors(workdir: str, config, record: dict, base_hf_dir: Optional[str]):
    """(hf_name, array, source) of the run's frozen base, and the HF dir it came from.

    An HF base streams tensor by tensor from its safetensors (the hash of its config checked
    first); a workdir or seed base is built whole by derta_jax.weights."""
    source = weights.lora_base_source(record, base_hf_dir)
    if "hf_dir" in source:
        weights.check_lora_hf_base(workdir, record, config, source["hf_dir"])
        return iter_checkpoint(source["hf_dir"]), source["hf_dir"]
    params = weights.load_lora_base(workdir, record, config)
    where = f"the LoRA run's base ({source})"
    tensors = export_hf_tensors(_model_state(config, params), config)
    return ((name, array, where) for name, array in tensors), None


def _export_lora_run(workdir: str, out: str, config, record: dict, step: int,
                     dtype: Optional[str], max_shard_size: str, lora: str,
                     tokenizer_dir: Optional[str], base_hf_dir: Optional[str]) -> list[str]:
    settings = record["settings"]
    abstract = nnx.state(weights.abstract_model(config, settings, record["seed"]), nnx.LoRAParam)
    adapters, step = wd.restore_params(workdir, nnx.to_pure_dict(abstract), step)
    from derta_jax.models.lora import adapter_pairs

    pairs = adapter_pairs(adapters)
    if lora == "adapter":
        tensors, targets = peft.peft_adapter_tensors(pairs, config)
        hf_dir = weights.lora_base_source(record, base_hf_dir).get("hf_dir")
        adapter_config = peft.peft_lora_config(settings.rank, settings.alpha, targets,
                                               dropout=settings.dropout,
                                               base_model_name_or_path=hf_dir)
        written = peft.write_peft_adapter(
            _cast(tensors, as_numpy_dtype(dtype or settings.dtype)), out, adapter_config,
            overwrite=True)
        written += _copy_tokenizer(
            paths.resolve(tokenizer_dir) if tokenizer_dir else epath.Path(wd.hf_files_path(workdir)),
            out)
        return written
    base, hf_dir = _base_tensors(workdir, config, record, base_hf_dir)
    out_dtype = dtype or config.param_dtype
    merged = peft.merged_hf_tensors(base, pairs, config, settings.alpha, settings.rank)
    written = write_safetensors_sharded(_cast(merged, as_numpy_dtype(out_dtype)), out,
                                        max_shard_size, overwrite=True)
    return written + _write_model_files(workdir, out, config, out_dtype, tokenizer_dir, hf_dir)


def _write_json(out: str, name: str, content: dict) -> list[str]:
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=True)
        f.write("\n")
    return [name]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m derta_jax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, default=None, help="default: the latest step")
    parser.add_argument("--out", required=True,
                        help="HF model directory to write (local, or gs://... like the workdir)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help="weight dtype (default: the parameter dtype)")
    parser.add_argument("--max_shard_size", default="5GB")
    parser.add_argument("--lora", choices=LORA_CHOICES, default="merge")
    parser.add_argument("--tokenizer_dir", default=None,
                        help="take tokenizer files from here instead of WORKDIR/hf_files")
    parser.add_argument("--base_hf_dir", default=None,
                        help="LoRA runs: the base model's HF dir (default: the one in lora.json)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    args = parser.parse_args(argv)
    files = export(args.workdir, args.out, step=args.step, dtype=args.dtype,
                   max_shard_size=args.max_shard_size, lora=args.lora,
                   overwrite=args.overwrite, tokenizer_dir=args.tokenizer_dir,
                   base_hf_dir=args.base_hf_dir)
    print(f"exported {args.workdir} -> {args.out}: {', '.join(files)}")
    return 0


def cli() -> None:
    """The console-script entry point (pyproject [project.scripts]), = python -m."""
    try:
        sys.exit(main())
    # Bad input, or gs:// without gcsfs installed: a message, no traceback.
    except (OSError, ValueError, NotImplementedError, ImportError) as error:
        print(f"python -m derta_jax.export: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
