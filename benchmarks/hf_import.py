"""Import time and peak host memory of converting a ~1 GB sharded HF checkpoint.

    python -m benchmarks.hf_import [--work_dir=/tmp/derta_hf_import_bench] [--shard_size=200MB]

Why: import must stream (peak host memory ~ the model plus one shard, never the model
twice), and the only honest check is to measure a checkpoint big enough for the
difference to show. The script writes a ~250M-parameter Llama checkpoint with random
float32 weights (names and shapes from transformers' LlamaForCausalLM on the meta
device) with derta_jax's sharded writer, then runs each measured step in a fresh child
process and reads that child's peak resident set size (ru_maxrss from wait4; the parent
stays small, since Linux counts the forking parent's resident pages in a child's peak):

  * baseline: the imports alone (python + jax + derta_jax),
  * read: stream every tensor through derta_jax.hf.safetensors_io and touch every byte,
  * load: build the model's parameter state from the shards (derta_jax.weights.load_hf_params:
    abstract model + streaming reader + name mapping), no checkpoint written,
  * convert: `python -m derta_jax.convert` to an Orbax workdir (load + Orbax save),
  * export: `python -m derta_jax.export` of that workdir back to sharded safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

BENCH_CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                    num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                    head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False,
                    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

BASELINE_SNIPPET = "import jax, flax.nnx, orbax.checkpoint, derta_jax.hf.safetensors_io"
READ_SNIPPET = BASELINE_SNIPPET + """
import sys, numpy as np
from derta_jax.hf.safetensors_io import iter_checkpoint
checksum = 0
for name, array, source in iter_checkpoint(sys.argv[1]):
    checksum ^= int(np.asarray(array).view(np.uint8).sum(dtype=np.uint64))
"""
LOAD_SNIPPET = BASELINE_SNIPPET + """
import sys, jax
from derta_jax.hf.config import model_config_from_hf
from derta_jax.weights import load_hf_params
state = load_hf_params(sys.argv[1], model_config_from_hf(sys.argv[1]))
jax.block_until_ready(jax.tree.leaves(state))
"""


def write_checkpoint(hf_dir: str, shard_size: str) -> int:
    """Random f32 Llama weights, sharded; returns the bytes of tensor data written."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from derta_jax.hf.safetensors_io import write_safetensors_sharded

    config = LlamaConfig(**BENCH_CONFIG)
    with torch.device("meta"):
        shapes = [(n, tuple(p.shape)) for n, p in LlamaForCausalLM(config).named_parameters()]
    rng = np.random.default_rng(0)

    def tensors():
        for name, shape in shapes:
            yield name, (rng.standard_normal(shape, dtype=np.float32) * 0.02)

    write_safetensors_sharded(tensors(), hf_dir, shard_size, overwrite=True)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float32"
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, default=str)
    return sum(int(np.prod(s)) * 4 for _, s in shapes)


def measure_child(argv: list[str]) -> tuple[float, float]:
    """Runs a child process; returns (seconds, its peak RSS in MiB)."""
    start = time.perf_counter()
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pid = subprocess.Popen(argv, cwd=repo_root).pid
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(argv)} failed with status {status}")
    return seconds, usage.ru_maxrss / 1024.0  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/derta_hf_import_bench")
    parser.add_argument("--shard_size", default="200MB")
    parser.add_argument("--skip_convert", action="store_true")
    parser.add_argument("--write_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    hf_dir = os.path.join(args.work_dir, "hf")
    out_dir = os.path.join(args.work_dir, "workdir")
    os.makedirs(args.work_dir, exist_ok=True)
    if args.write_only:
        write_checkpoint(hf_dir, args.shard_size)
        return

    py = sys.executable
    write_s, _ = measure_child([py, "-m", "benchmarks.hf_import", f"--work_dir={args.work_dir}",
                                f"--shard_size={args.shard_size}", "--write_only"])
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        data_bytes = json.load(f)["metadata"]["total_size"]
    shard_bytes = max(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir)
                      if f.endswith(".safetensors"))
    shards = len([f for f in os.listdir(hf_dir) if f.endswith(".safetensors")])
    results = {"checkpoint_MiB": data_bytes / 2**20, "shards": shards,
               "largest_shard_MiB": shard_bytes / 2**20, "write_s": write_s}

    results["baseline_s"], results["baseline_peak_MiB"] = measure_child([py, "-c", BASELINE_SNIPPET])
    results["read_s"], results["read_peak_MiB"] = measure_child([py, "-c", READ_SNIPPET, hf_dir])
    if not args.skip_convert:
        results["load_s"], results["load_peak_MiB"] = measure_child([py, "-c", LOAD_SNIPPET, hf_dir])
        shutil.rmtree(out_dir, ignore_errors=True)
        results["convert_s"], results["convert_peak_MiB"] = measure_child(
            [py, "-m", "derta_jax.convert", f"--hf_dir={hf_dir}", f"--out={out_dir}"])
        export_dir = os.path.join(args.work_dir, "exported")
        shutil.rmtree(export_dir, ignore_errors=True)
        results["export_s"], results["export_peak_MiB"] = measure_child(
            [py, "-m", "derta_jax.export", f"--workdir={out_dir}", f"--out={export_dir}",
             f"--max_shard_size={args.shard_size}"])
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()},
                     indent=2))



if __name__ == "__main__":
    main()
