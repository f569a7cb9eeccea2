"""Where the CPU training step's time goes, derta_jax against HF PyTorch (issue 14, item 1).

Three views of the benchmark step of benchmarks/train_step.py (same model, weights, batch):
  1. an ablation, timed as every comparison is (benchmarks/timing.py: interleaved, medians,
     wall and CPU seconds, load before and after): derta_jax's step as configured, the same
     step with attention replaced by a stand-in that only reads q, k and v (what the step
     costs without attention), and PyTorch's step;
  2. PyTorch's own profiler: self CPU milliseconds per aten op per step;
  3. XLA's: the step's thunks from a profiler trace (XLA_FLAGS gains
     --xla_cpu_enable_xprof_traceme=true), milliseconds per step per kind of operation,
     the kind read from the compiled HLO (a library dot, a loop fusion that transposes, ...)
     and whether it belongs to attention (its jaxpr names). Thunks run concurrently, so
     the sum exceeds the step's wall time: the shares, not the sum, are the finding.

    python -m benchmarks.step_profile [--repeats 7] [--batch 8 --seq 256 ...]
"""

from __future__ import annotations

import os

_TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
if _TRACE_FLAG not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts its CPU client
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _TRACE_FLAG).strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import train_step_setup as setup  # noqa: E402
from benchmarks.timing import (cores, interleaved_samples, load1, load_average, loaded,  # noqa: E402
                               loaded_line, ratio_cell)
from derta_jax import loss as derta  # noqa: E402
from derta_jax.models import attention as attention_lib  # noqa: E402

# names of the attention's operations in the trace: jax.nn.dot_product_attention's (vmapped
# over kv head groups) in each block of models/attention.chunked_attention, or the C++
# kernel's custom calls (models/cpu_flash.py)
ATTENTION_NAMES = re.compile(r"BNTS|BTNH|BSNH|vmap|_where|softmax|derta_cpu_flash|ffi_call")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--trace_steps", type=int, default=3, help="steps in the XLA trace")
    for field, value in vars(setup.BenchShape()).items():
        p.add_argument(f"--{field}", type=int, default=value)
    return p.parse_args(argv)


@contextlib.contextmanager
def attention_stand_in():
    """While tracing: attention replaced by q plus a zero that still reads k and v, so the
    projections and everything around attention stay in the step."""
    real = attention_lib.self_attention
    attention_lib.self_attention = (
        lambda q, k, v, segment_ids, window, setting="auto": q + 0.0 * (jnp.sum(k) + jnp.sum(v)))
    try:
        yield
    finally:
        attention_lib.self_attention = real


def jax_runner(model, batch, stand_in: bool):
    loss = derta.LossConfig(rto_keep_rate=0.05)
    with attention_stand_in() if stand_in else contextlib.nullcontext():
        step, fresh_state, frozen = setup.compile_step(
            setup.make_jax_step(model, loss, setup.optimizer_config()), batch)
    device_batch, box = setup.to_device(batch), {"state": fresh_state()}

    def run():
        box["state"], metrics = step(box["state"], frozen, device_batch)
        return metrics["loss"].block_until_ready()

    return run, step


def torch_profile(step, steps: int = 3) -> list[tuple[str, float]]:
    """(aten op, self CPU ms per step), largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    rows = [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[1])


def xla_profile(run, compiled, steps: int) -> dict[tuple[str, bool], float]:
    """{(kind of operation, attention?): ms per step} from a profiler trace of `run`."""
    kinds = {}
    for line in compiled.as_text().splitlines():
        found = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
        if found:
            name, op_name = found.groups()
            kinds.setdefault(name, (re.sub(r"\.\d+$", "", name),
                                    bool(ATTENTION_NAMES.search(op_name))))
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        path = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event["name"] in kinds:
            totals[kinds[event["name"]]] += event["dur"] / 1e3 / steps
    return dict(totals)


def main(argv=None) -> None:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(cores())
    shape = setup.BenchShape(**{f: getattr(args, f) for f in vars(setup.BenchShape())})
    hf_model, model, _ = setup.build_models(shape, attention_impl="auto")
    if jax.default_backend() != "cpu":
        raise SystemExit("step_profile: it profiles the CPU step against PyTorch's; run it on a "
                         "CPU backend")
    batch, _ = setup.derta_and_sft_batches(shape, refusal_id=3, prompt_len=max(1, shape.seq // 4))
    full, compiled = jax_runner(model, batch, stand_in=False)
    without, _ = jax_runner(model, batch, stand_in=True)
    torch_step = setup.make_torch_step(hf_model, setup.optimizer_config())
    torch_batch = setup.to_torch(batch)
    fns = {"derta_jax": full, "derta_jax, attention removed": without,
           "PyTorch": lambda: float(torch_step(torch_batch))}
    info = {"cores": cores(), "load_before": load_average(), "load1_before": load1()}
    wall, cpu = interleaved_samples(fns, args.repeats)
    info.update(load_after=load_average(), load1_after=load1())
    hold = loaded(info)
    print(f"batch {shape.batch} x {shape.seq}, hidden {shape.hidden}, {shape.layers} layers, "
          f"vocab {shape.vocab}; jax {jax.__version__} (attention_impl=auto -> "
          f"{attention_lib.resolve_attention_impl('auto')}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {args.repeats} interleaved repetitions; load "
          f"before {info['load_before']}, after {info['load_after']}")
    for line in loaded_line(info):
        print(line)
    medians = {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}
    print("\n| step | wall ms | CPU ms | PyTorch / this (wall) |\n|---|---|---|---|")
    for name, (w, c) in medians.items():
        print(f"| {name} | {w * 1e3:.0f} | {c * 1e3:.0f} | "
              f"{ratio_cell(medians['PyTorch'][0] / w, hold, bold=False)} |")
    attention_ms = (medians["derta_jax"][0] - medians["derta_jax, attention removed"][0]) * 1e3
    print(f"\nattention in derta_jax's step: {attention_ms:.0f} ms wall per step")
    profile = torch_profile(lambda: torch_step(torch_batch))
    total = sum(ms for _, ms in profile)
    print(f"\nPyTorch profiler, self CPU ms per step (total {total:.0f}):")
    for name, ms in profile[:8]:
        print(f"  {ms:7.1f}  {name}")
    xla = xla_profile(full, compiled, args.trace_steps)
    total = sum(xla.values())
    attention = sum(ms for (_, is_attention), ms in xla.items() if is_attention)
    print(f"\nXLA trace, ms per step summed over thunks (they overlap; total {total:.0f}); "
          f"attention's share {attention / total:.0%}:")
    for (kind, is_attention), ms in sorted(xla.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {ms:7.1f}  {kind}{'  (attention)' if is_attention else ''}")


if __name__ == "__main__":
    main()
