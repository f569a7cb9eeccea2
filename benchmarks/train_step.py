"""Training-step benchmarks for BENCHMARKS.md (issue 5): derta_jax against HF PyTorch, MFU,
the DeRTa loss's overhead over plain SFT, and packing against padding.

How it is timed (benchmarks/timing.py): every figure is a RATIO of things timed side by
side in one process, interleaved repetition by repetition in a fresh random order, median
of each, with the process CPU time of each call (all threads) beside the wall time and the
load average before and after. A run whose 1-minute load exceeded the cores is marked
LOADED and prints no headline ratio. The ratio of the fastest samples is printed too.

  1. full training step (forward + loss + backward + AdamW) tokens/s, derta_jax (the
     trainer's make_train_step, DeRTa loss at rto_keep_rate 0.05) against HF
     MistralForCausalLM + torch.optim.AdamW (cross-entropy over the same targets), same
     weights, same batch; torch gets as many threads as XLA's CPU client uses (all cores);
  2. achieved FLOP/s of that step (flops.training_flops_per_token x tokens / time) against
     the machine's measured f32 matmul peak (a large jnp.dot, timed in the same rotation);
  3. DeRTa step (half the rows harmful, RTO positions, keep rate 0.05) against plain SFT on
     the same tokens (no RTO, next-token targets, keep rate 1.0);
  4. packing against padding, in useful (non-pad) tokens/s, on two mixed-length mixtures:
     the project's synthetic DeRTa world (tokenized) and rows with lengths shaped like the
     paper's mixture (benchmarks.packing_efficiency.synthetic_lengths, scaled to seq).
AOT compile time and per-device memory of the 7B/70B steps: benchmarks/scale_table.py.

    python -m benchmarks.train_step [--quick] [--repeats 7]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.packing_efficiency import synthetic_lengths
from benchmarks import train_step_setup as setup
from benchmarks.timing import (interleaved_samples, load1, load_average, loaded,  # noqa: F401
                               loaded_line, ratio_cell)
from derta_jax import loss as derta
from derta_jax.models.attention import resolve_attention_impl
from derta_jax.models.config import ATTENTION_IMPLS
from derta_jax.train.flops import training_flops_per_token


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="2 repetitions, 8 matmuls of 1024 (about 2 min loaded)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved repetitions (median)")
    for field, value in vars(setup.BenchShape()).items():
        p.add_argument(f"--{field}", type=int, default=value)
    p.add_argument("--keep_rate", type=float, default=0.05, help="RTO keep rate of the DeRTa step")
    p.add_argument("--attention_impl", default="auto", choices=ATTENTION_IMPLS,
                   help="derta_jax's attention (model.attention_impl; auto = the model's "
                        "CPU default, models/attention.resolve_attention_impl)")
    p.add_argument("--matmul", type=int, default=2048, help="n of the n x n f32 peak matmul")
    p.add_argument("--matmul_count", type=int, default=4, help="matmuls per timed call")
    p.add_argument("--mixture_rows", type=int, default=512,
                   help="rows of each mixed-length mixture (packing vs padding)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.matmul, args.matmul_count = min(args.repeats, 2), 1024, 8
    if args.repeats < 1:
        p.error(f"--repeats={args.repeats}: must be >= 1")
    return args


def machine() -> dict:
    import torch
    import transformers

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "jax": jax.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "backend": jax.default_backend(), "devices": jax.device_count()}


# --- timed callables ----------------------------------------------------------------------


def jax_step_runner(compiled_step, batches):
    """A no-argument callable running one donated step of `compiled_step` (compile_step's
    triple, shared) on the next of `batches`, cycling, with its own state."""
    step, fresh_state, frozen = compiled_step
    device_batches = itertools.cycle([setup.to_device(b) for b in batches])
    box = {"state": fresh_state()}

    def run():
        box["state"], metrics = step(box["state"], frozen, next(device_batches))
        return metrics["loss"].block_until_ready()

    return run


def torch_step_runner(hf_model, optim, batch):
    step = setup.make_torch_step(hf_model, optim)
    torch_batch = setup.to_torch(batch)
    return lambda: float(step(torch_batch))


def matmul_runner(n: int, count: int):
    """`count` f32 [n, n] @ [n, n] products per call (2 n^3 FLOPs each): a call lasts about as
    long as a training step, so load spikes average out alike on both sides of the ratio."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)

    def run():
        products = [dot(a, b) for _ in range(count)]
        return jax.block_until_ready(products)

    return run


def lengths_mixture_rows(num_rows: int, shape: setup.BenchShape, refusal_id: int,
                         seed: int = 0) -> list[dict]:
    """Rows whose lengths follow packing_efficiency's DeRTa-shaped mixture (helpful ~350,
    safety ~120 tokens at seq 1024) scaled to `shape.seq`; random tokens; every other row
    an RTO row. Only shapes and masks matter for the step's cost."""
    lengths = synthetic_lengths(num_rows, 1024, seed) * shape.seq // 1024
    lengths = np.clip(lengths, 8, shape.seq)
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(lengths.tolist()):
        ids = rng.integers(3, shape.vocab, n).astype(np.int32)
        loss_mask = np.zeros(n, bool)
        loss_mask[n // 3: n - 1] = True
        rto = loss_mask & (i % 2 == 1)
        targets = np.zeros(n, np.int32)
        targets[:-1] = ids[1:]
        targets = np.where(rto, refusal_id, np.where(loss_mask, targets, 0)).astype(np.int32)
        rows.append({"input_ids": ids, "targets": targets, "loss_mask": loss_mask, "rto_mask": rto})
    return rows


# --- the run ---------------------------------------------------------------------------------


def run(args) -> dict:
    import torch

    info = machine()
    torch.set_num_threads(info["cores"])
    info["torch_threads"] = torch.get_num_threads()
    info["load_before"], info["load1_before"] = load_average(), load1()
    info["attention_impl"] = (f"{args.attention_impl} -> "
                              f"{resolve_attention_impl(args.attention_impl, 'cpu')}")
    shape = setup.BenchShape(**{f: getattr(args, f) for f in vars(setup.BenchShape())})
    optim = setup.optimizer_config()
    hf_model, model, model_cfg = setup.build_models(shape, attention_impl=args.attention_impl)
    refusal_id = 3
    derta_batch, sft_batch = setup.derta_and_sft_batches(shape, refusal_id,
                                                         prompt_len=max(1, shape.seq // 4))
    keep = derta.LossConfig(rto_keep_rate=args.keep_rate)
    plain = derta.LossConfig(rto_keep_rate=1.0)

    world_rows, pad_id = setup.synthetic_world_rows(shape.vocab, shape.seq)
    mixtures = {"synthetic world": world_rows[:args.mixture_rows],
                "paper-shaped lengths": lengths_mixture_rows(args.mixture_rows, shape, refusal_id)}
    mixture_batches = {name: setup.padded_and_packed_batches(rows, shape, pad_id)
                       for name, rows in mixtures.items()}

    derta_step = setup.compile_step(setup.make_jax_step(model, keep, optim), derta_batch)
    sft_step = setup.compile_step(setup.make_jax_step(model, plain, optim), sft_batch)
    runners = {"jax_derta": jax_step_runner(derta_step, [derta_batch]),
               "torch": torch_step_runner(hf_model, optim, derta_batch),
               "jax_sft": jax_step_runner(sft_step, [sft_batch]),
               "matmul": matmul_runner(args.matmul, args.matmul_count)}
    for name, (padded, packed) in mixture_batches.items():
        runners[f"{name}|padding"] = jax_step_runner(derta_step, padded)
        runners[f"{name}|packing"] = jax_step_runner(derta_step, packed)
    costs = {"jax_derta": setup.xla_cost(derta_step[0]), "jax_sft": setup.xla_cost(sft_step[0])}
    start = time.perf_counter()
    samples, cpu_samples = interleaved_samples(runners, args.repeats)
    medians = {name: statistics.median(t) for name, t in samples.items()}
    fastest = {name: min(t) for name, t in samples.items()}
    cpu = {name: statistics.median(t) for name, t in cpu_samples.items()}
    info["load_after"], info["load1_after"] = load_average(), load1()
    info["seconds"] = time.perf_counter() - start

    tokens = shape.batch * shape.seq
    flops_per_token = training_flops_per_token(model_cfg, shape.seq)
    results = {
        "shape": shape, "info": info, "medians": medians, "fastest": fastest, "cpu": cpu,
        "tokens_per_step": tokens, "repeats": args.repeats,
        "jax_tokens_per_s": tokens / medians["jax_derta"],
        "torch_tokens_per_s": tokens / medians["torch"],
        "flops_per_token": flops_per_token,
        "achieved_flops": flops_per_token * tokens / medians["jax_derta"],
        "peak_flops": args.matmul_count * 2.0 * args.matmul**3 / medians["matmul"],
        "derta_over_sft": medians["jax_derta"] / medians["jax_sft"],
        "xla_costs": costs,
        "matmul": (f"{args.matmul_count} matmuls {args.matmul}x{args.matmul} in "
                   f"{medians['matmul'] * 1e3:.0f} ms"),
        "mixtures": {},
    }
    results["speedup"] = results["jax_tokens_per_s"] / results["torch_tokens_per_s"]
    results["speedup_fastest"] = fastest["torch"] / fastest["jax_derta"]
    results["derta_over_sft_fastest"] = fastest["jax_derta"] / fastest["jax_sft"]
    results["mfu_fastest"] = (flops_per_token * tokens / fastest["jax_derta"]) / (
        args.matmul_count * 2.0 * args.matmul**3 / fastest["matmul"])
    results["speedup_cpu"] = cpu["torch"] / cpu["jax_derta"]
    results["derta_over_sft_cpu"] = cpu["jax_derta"] / cpu["jax_sft"]
    results["mfu_cpu"] = (flops_per_token * tokens / cpu["jax_derta"]) / (
        args.matmul_count * 2.0 * args.matmul**3 / cpu["matmul"])
    results["mfu"] = results["achieved_flops"] / results["peak_flops"]
    for name, (padded, packed) in mixture_batches.items():
        row = {"rows": len(mixtures[name]),
               "mean_length": float(np.mean([len(r["input_ids"]) for r in mixtures[name]]))}
        for mode, batches in (("padding", padded), ("packing", packed)):
            useful = sum(setup.useful_tokens(b) for b in batches)
            row[mode] = {"steps": len(batches), "non_pad": useful / (len(batches) * tokens),
                         "useful_tokens_per_s": useful / len(batches) / medians[f"{name}|{mode}"],
                         "useful_tokens_per_cpu_s": useful / len(batches) / cpu[f"{name}|{mode}"]}
        row["ratio"] = row["packing"]["useful_tokens_per_s"] / row["padding"]["useful_tokens_per_s"]
        row["ratio_cpu"] = (row["packing"]["useful_tokens_per_cpu_s"]
                            / row["padding"]["useful_tokens_per_cpu_s"])
        results["mixtures"][name] = row
    return results


def report(results: dict, command: str) -> str:
    s, i = results["shape"], results["info"]
    ms = {k: v * 1e3 for k, v in results["medians"].items()}
    best = {k: v * 1e3 for k, v in results["fastest"].items()}
    cpu = {k: v * 1e3 for k, v in results["cpu"].items()}
    costs = results["xla_costs"]
    analytic = results["flops_per_token"] * results["tokens_per_step"]
    hold = loaded(i)
    rc = lambda value, digits=2, bold=True: ratio_cell(value, hold, digits, bold)  # noqa: E731
    lines = [
        f"command: `{command}`",
        f"machine: {i['cpu']}, {i['cores']} cores, jax {i['jax']} ({i['backend']}, "
        f"{i['devices']} device(s); XLA CPU uses all {i['cores']} cores), torch {i['torch']} "
        f"({i['torch_threads']} threads), transformers {i['transformers']}",
        f"load average (1/5/15 min): before {i['load_before']}, after {i['load_after']}; "
        f"{results['repeats']} interleaved repetitions in {i['seconds']:.0f} s",
        *loaded_line(i),
        f"config: Mistral, vocab {s.vocab}, hidden {s.hidden}, {s.layers} layers, {s.heads} heads "
        f"(attention_impl {i.get('attention_impl', 'xla')}) "
        f"({s.kv_heads} kv), intermediate {s.intermediate}; batch {s.batch} x {s.seq} tokens, "
        f"float32. Wall ms = median (fastest) per step, ratio of medians (of fastest); "
        f"CPU ms = median process CPU time per step (all threads), ratio of those",
        "",
        "| training step | wall ms/step | tokens/s | ratio | CPU ms/step | CPU ratio |",
        "|---|---|---|---|---|---|",
        f"| derta_jax (DeRTa loss, keep 0.05, AdamW, jit) | {ms['jax_derta']:.0f} "
        f"({best['jax_derta']:.0f}) | {results['jax_tokens_per_s']:,.0f} "
        f"| {rc(results['speedup'])} ({rc(results['speedup_fastest'], bold=False)}) "
        f"| {cpu['jax_derta']:.0f} | {rc(results['speedup_cpu'], bold=False)} |",
        f"| HF MistralForCausalLM + torch AdamW (eager, CE) | {ms['torch']:.0f} "
        f"({best['torch']:.0f}) | {results['torch_tokens_per_s']:,.0f} | 1.00x "
        f"| {cpu['torch']:.0f} | 1.00x |",
        "",
        "| achieved FLOP/s (derta_jax step) | measured f32 matmul peak | MFU (fastest) "
        "| MFU per CPU second |",
        "|---|---|---|---|",
        f"| {results['achieved_flops'] / 1e9:.1f} GFLOP/s ({results['flops_per_token'] / 1e6:.1f} "
        f"MFLOP/token) | {results['peak_flops'] / 1e9:.1f} GFLOP/s ({results['matmul']}) "
        f"| {'withheld (loaded)' if hold else format(results['mfu'], '.0%')} "
        f"({'-' if hold else format(results['mfu_fastest'], '.0%')}) "
        f"| {'-' if hold else format(results['mfu_cpu'], '.0%')} |",
        "",
        f"FLOPs per step: analytic (derta_jax.train.flops) {analytic / 1e9:.2f} G, counted by "
        f"XLA's cost_analysis() {costs['jax_derta']['flops'] / 1e9:.2f} G "
        f"({costs['jax_derta']['flops'] / analytic:.3f}x).",
        "",
        "| loss in the step | wall ms/step | ratio | CPU ms/step | CPU ratio |",
        "|---|---|---|---|---|",
        f"| plain SFT (no RTO, keep 1.0) | {ms['jax_sft']:.0f} ({best['jax_sft']:.0f}) | 1.00x "
        f"| {cpu['jax_sft']:.0f} | 1.000x |",
        f"| DeRTa (half rows RTO, keep 0.05) | {ms['jax_derta']:.0f} ({best['jax_derta']:.0f}) "
        f"| {rc(results['derta_over_sft'], 3)} ({rc(results['derta_over_sft_fastest'], 3, False)}) "
        f"| {cpu['jax_derta']:.0f} | {rc(results['derta_over_sft_cpu'], 3, False)} |",
        "",
        f"Load-independent, from XLA's cost_analysis() of the two compiled steps: DeRTa / SFT "
        f"FLOPs {costs['jax_derta']['flops'] / costs['jax_sft']['flops']:.5f}x, bytes accessed "
        f"{costs['jax_derta']['bytes'] / costs['jax_sft']['bytes']:.5f}x.",
        "",
        "| mixture (derta_jax step) | mode | steps | non-pad | useful tokens/s | ratio "
        "| useful tokens per CPU s | CPU ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["mixtures"].items():
        label = f"{name} ({row['rows']} rows, mean {row['mean_length']:.0f} tokens)"
        for mode in ("padding", "packing"):
            r = row[mode]
            ratio = "1.00x" if mode == "padding" else rc(row["ratio"])
            ratio_cpu = "1.00x" if mode == "padding" else rc(row["ratio_cpu"], bold=False)
            lines.append(f"| {label} | {mode} | {r['steps']} | {r['non_pad']:.3f} "
                         f"| {r['useful_tokens_per_s']:,.0f} | {ratio} "
                         f"| {r['useful_tokens_per_cpu_s']:,.0f} | {ratio_cpu} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    results = run(parse_args(argv))
    print(report(results, " ".join(["python -m benchmarks.train_step", *argv])), flush=True)
    return results


if __name__ == "__main__":
    main()
