"""Scale figures for BENCHMARKS.md: the smallest mesh on which each paper recipe fits.

Why: the paper's runs (7B/8B full fine-tuning, 70B and 8x7B LoRA) are priced by how many
chips they need; this computes it with the planner (derta_jax.plan), so the figures move
when the model, the step or the sharding rules change.

For each recipe and target (TPU v5p chips, H100-80GB GPUs) it walks device counts 1, 2, 4,
... (v5p from 4 chips, the smallest slice), with an FSDP-only mesh (fsdp = all devices).
At each count it tries the recipe's own micro-batching, then one sequence per device per
micro-batch (the least activation memory), and keeps the first that fits:
  1. analytic screen: parameter/gradient/Adam bytes from the trainer's shardings plus a
     rough activation estimate (derta_jax.train.plan_memory);
  2. confirmation by XLA: the real train step (full fine-tuning, or LoRA adapters over the
     frozen base) is AOT-compiled for that many fake CPU devices and its memory_analysis()
     peak must fit. XLA:CPU computes bf16 matmuls in f32 and may hoist an f32 copy of bf16
     weights out of the layer loop, so for bf16 bases (the LoRA recipes) this is an upper
     bound and the analytic mesh a lower one: the table gives both.
Memory per device is the whole HBM (TPU: GiB per chip; H100: 80e9 bytes; JAX on GPU needs
XLA_PYTHON_CLIENT_MEM_FRACTION raised to use it).

Communication per step and device (ring collectives, FSDP axis n, M micro-batches):
    V = M * (2 W + G) * (n - 1) / n
with W the parameter bytes an fsdp group gathers (forward + remat/backward gather) and G the
trained gradients it reduce-scatters; an upper bound (XLA may hoist or gather after the
bf16 cast). The step time is FLOPs / (devices x peak x assumed MFU 40%).

    python -m benchmarks.scale_table                      # all four recipes, both targets
    python -m benchmarks.scale_table --recipes=mistral7b --targets=h100 --nocompile
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time

RECIPES = {
    "mistral7b": ("mistral7b full FT", "configs.mistral7b"),
    "llama3_8b": ("llama3_8b full FT", "configs.llama3_8b"),
    "llama3_70b_lora": ("llama3_70b LoRA", "configs.llama3_70b_lora"),
    "mixtral8x7b_lora": ("mixtral8x7b LoRA", "configs.mixtral8x7b_lora"),
}
TARGETS = {"v5p": (4, lambda n: f"v5p-{2 * n}"), "h100": (1, lambda n: f"h100x{n}")}
GIB = 2.0**30


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--max_devices", type=int, default=128)
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--nocompile", action="store_true", help="analytic only (fast)")
    return p.parse_args(argv)


def micro_batch_candidates(batch_size: int, configured: int, devices: int) -> list[int]:
    """The recipe's micro-batch count if the batch splits over `devices`, then one sequence
    per device per micro-batch."""
    if batch_size % devices:
        return []
    frugal = batch_size // devices
    own = [configured] if (batch_size // configured) % devices == 0 else []
    return list(dict.fromkeys(own + [frugal]))


def _trial(config, devices: int, micro: int):
    trial = config.copy_and_resolve_references()
    trial.mesh.data, trial.mesh.fsdp, trial.mesh.tensor, trial.mesh.expert = 1, devices, 1, 1
    trial.train.micro_batches = micro
    return trial


def smallest_fits(config, target: str, args, plan_lib, parse_topology):
    """(first plan whose analytic total fits, first plan whose compiled peak fits or None)."""
    first, name_for = TARGETS[target]
    analytic = None
    n = first
    while n <= args.max_devices:
        topology = parse_topology(name_for(n))
        for micro in micro_batch_candidates(config.train.batch_size, config.train.micro_batches, n):
            plan = plan_lib.make_plan(_trial(config, n, micro), n, topology, compile_step=False,
                                      mfu=args.mfu)
            if not plan["fits"]:
                continue
            analytic = analytic or plan
            if args.nocompile:
                return analytic, None
            plan = plan_lib.make_plan(_trial(config, n, micro), n, topology, compile_step=True,
                                      mfu=args.mfu)
            if plan["fits"]:
                return analytic, plan
        n *= 2
    return analytic, None


def _mesh(plan) -> str:
    return f"{plan['topology']['name']} ({plan['devices']} dev)" if plan else "none"


def row(label: str, target: str, analytic, compiled, compiled_run: bool = True) -> str:
    plan = compiled or analytic
    if plan is None:
        return f"| {label} | {target}: none up to the limit | | | | | |"
    d, b, v = plan["per_device"], plan["batch"], plan["comm_bytes_per_device"]
    memory = (f"params {d['params'] / GIB:.1f} + grads {d['grads'] / GIB:.1f} + Adam "
              f"{d['optimizer'] / GIB:.1f} + act ~{d['activations_estimate'] / GIB:.1f} "
              f"= {d['analytic_peak'] / GIB:.1f}")
    if compiled:
        k = compiled["compiled"]
        memory += (f"; XLA: args {k['argument_bytes'] / GIB:.1f} + temps {k['temp_bytes'] / GIB:.1f}"
                   f" = {k['peak_bytes'] / GIB:.1f} (compile {k['compile_seconds']:.0f} s)")
    compiled_mesh = _mesh(compiled) if compiled_run else "not run (--nocompile)"
    return (f"| {label} | {_mesh(analytic)} | {compiled_mesh} "
            f"| {b['micro_batches']} x {b['seqs_per_device']} seq/dev | {memory} "
            f"| {plan['topology']['hbm_bytes'] / GIB:.1f} "
            f"| {v['total'] / GIB:,.0f} (AG {v['fsdp_all_gather'] / GIB:,.0f}, RS {v['fsdp_reduce_scatter'] / GIB:,.0f}) "
            f"| {plan['speed']['step_seconds']:.1f} |")


def main(argv=None):
    args = parse_args(argv if argv is not None else sys.argv[1:])
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from derta_jax.train.mesh import use_host_cpu_devices

    use_host_cpu_devices(args.max_devices)  # before JAX's backends start
    import jax

    from derta_jax import plan as plan_lib
    from derta_jax.train.topology import parse_topology

    print("| recipe | smallest mesh (analytic) | smallest mesh (XLA CPU compile) | micro-batches "
          "| per device (GiB), at the right-most mesh | HBM (GiB) "
          "| comm per step per device (GiB) | step s @ 40% MFU |")
    print("|---|---|---|---|---|---|---|---|")
    start = time.perf_counter()
    for key in args.recipes.split(","):
        label, module = RECIPES[key]
        config = importlib.import_module(module).get_config()
        config.data.synthetic = True  # the plan needs no data; validation wants a source
        for target in args.targets.split(","):
            fits = smallest_fits(config, target, args, plan_lib, parse_topology)
            print(row(label, target, *fits, compiled_run=not args.nocompile), flush=True)
    print(f"\ncommand: python -m benchmarks.scale_table {' '.join(argv or sys.argv[1:])}".rstrip())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__}, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
