"""Convert a Hugging Face safetensors checkpoint into a derta_jax workdir (Orbax).

    python -m derta_jax.convert --hf_dir=DIR --out=WORKDIR [--dtype=float32|bfloat16]
                                [--scan_layers] [--shards=16] [--overwrite]

Why a separate step: a converted workdir restores in seconds with the exact shardings
the trainer wants, each process reading only its own shards (`--config.model.init_from=
WORKDIR`, local or gs://: on a pod, convert once into a bucket instead of copying the HF
weights to every host), and is the same layout the trainer writes, so `derta_jax.export`
and `derta_jax.evaluate` read either.

Orbax stores an array in one chunk per shard it was saved from. Saved whole from one host,
each array would be one chunk, and every process of a pod would read the whole model to
keep its slice. So convert lays the weights out as the trainer's FSDP does (the embed
dimension split over `--shards` host CPU devices, as MaxText's converters do) before saving:
a pod of up to `--shards` processes reads only its own share of the bucket, a larger one
about 1/shards per process. (An array whose embed size `--shards` does not divide stays
whole, as the trainer would replicate it.) The model is never randomly initialised: its shapes come from
`nnx.eval_shape`, and tensors stream from the safetensors shards one at a time
(derta_jax.hf.safetensors_io) through the name table (derta_jax.hf.mapping).

Output layout (derta_jax/workdir.py; --out may be local or gs://):

    WORKDIR/model_config.json        the ModelConfig (scan_layers, dtypes included)
    WORKDIR/hf_files/                tokenizer files, chat template, generation_config.json,
                                     source_config.json (the HF config.json, for export)
    WORKDIR/checkpoints/0/params/    Orbax CheckpointManager step 0, item "params"
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from derta_jax import paths, weights
from derta_jax import workdir as wd
from derta_jax.hf.config import model_config_from_hf
from derta_jax.hf.safetensors_io import scan_checkpoint
from derta_jax.hf.tokenizer_files import copy_tokenizer_files
from derta_jax.models.config import ModelConfig

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
DEFAULT_SHARDS = 16  # the command's host CPU devices: each array's chunks along embed
OUTPUTS = (wd.CHECKPOINTS_DIR, wd.HF_FILES_DIR, wd.MODEL_CONFIG_FILE)


def convert(hf_dir: str, out: str, dtype: Optional[str] = None, scan_layers: bool = False,
            overwrite: bool = False, shards: Optional[int] = None) -> ModelConfig:
    """HF dir -> workdir with step 0; returns the ModelConfig written to the workdir.

    `shards`: the host CPU devices the arrays are split over (FSDP's layout) when saved,
    hence the chunks a restoring process reads; default: all of this process's."""
    overrides = {"scan_layers": scan_layers}
    if dtype is not None:
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype={dtype!r}: must be one of {DTYPE_CHOICES}")
        overrides["param_dtype"] = dtype
    config = model_config_from_hf(hf_dir, **overrides)
    scan_checkpoint(hf_dir)  # every header validated before anything is written
    paths.prepare_output_dir(out, overwrite, replaces=OUTPUTS)
    wd.save_params(out, 0, weights.load_hf_params(hf_dir, config, _fsdp_shardings(config, shards)))
    wd.write_model_config(out, config)
    with paths.staged(wd.hf_files_path(out)) as local:
        copy_tokenizer_files(hf_dir, local, overwrite=True, include_generation_config=True)
        with open(os.path.join(hf_dir, "config.json"), "rb") as source, \
                open(os.path.join(local, wd.SOURCE_CONFIG_FILE), "wb") as target:
            target.write(source.read())
    return config


def _fsdp_shardings(config: ModelConfig, shards: Optional[int]) -> dict:
    """The trainer's FSDP shardings of the parameters over `shards` host CPU devices."""
    import jax
    from flax import nnx

    from derta_jax.models import sharding as sharding_lib
    from derta_jax.train import mesh as mesh_lib

    devices = jax.local_devices(backend="cpu")
    shards = shards or len(devices)
    if not 1 <= shards <= len(devices):
        raise ValueError(f"--shards={shards}: this process has {len(devices)} CPU device(s)")
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": shards, "tensor": 1, "expert": 1},
                              devices=devices[:shards])
    return nnx.to_pure_dict(sharding_lib.state_shardings(weights.abstract_params(config), mesh))


def main(argv: Optional[Sequence[str]] = None, *, own_process: bool = False) -> int:
    """The command; `own_process` when it is the process (cli): it then computes on
    --shards host CPU devices only, never taking an accelerator a trainer may be using."""
    parser = argparse.ArgumentParser(prog="python -m derta_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_dir", required=True, help="HF model dir with config.json + safetensors")
    parser.add_argument("--out", required=True, help="workdir to create")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help="parameter dtype (default: the checkpoint's dtype, else float32)")
    parser.add_argument("--scan_layers", action="store_true", help="store layers stacked")
    parser.add_argument("--shards", type=int, default=None,
                        help=f"split each array's embed dimension into this many stored chunks, "
                             f"so that a pod's process reads about its own share (default: "
                             f"{DEFAULT_SHARDS} as a command; in-process, the process's CPU "
                             f"devices)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing workdir's checkpoints")
    args = parser.parse_args(argv)
    if args.shards is not None and args.shards < 1:
        parser.error(f"--shards={args.shards}: must be >= 1")
    shards = args.shards
    if own_process:  # JAX's backends have not started: this process gets its CPU devices
        from derta_jax.train.mesh import use_host_cpu_devices

        shards = shards or DEFAULT_SHARDS  # fewer devices than asked for is an error, not 1
        use_host_cpu_devices(shards)
    config = convert(args.hf_dir, args.out, dtype=args.dtype, scan_layers=args.scan_layers,
                     overwrite=args.overwrite, shards=shards)
    print(f"converted {args.hf_dir} ({config.family}, {config.num_layers} layers, "
          f"{config.param_dtype}, scan_layers={config.scan_layers}) -> {args.out}")
    return 0


def cli() -> None:
    """The console-script entry point (pyproject [project.scripts]), = python -m."""
    try:
        sys.exit(main(own_process=True))
    except (OSError, ValueError, NotImplementedError) as error:  # bad input: message, no traceback
        print(f"python -m derta_jax.convert: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
