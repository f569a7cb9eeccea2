"""One command for the first GPU or TPU derta_jax meets (issue 14, item 4): what the
accelerator gives, measured by the project's own pieces, printed and kept as JSON.

Why: every figure in BENCHMARKS.md so far is a CPU figure. Accelerator time is scarce and
arrives without warning, so the questions it must answer are fixed here in advance and
answered by one run (under 8 minutes on one H100/H200):
  device   the device kind, its count, and its nominal dense peak when known;
  peak     a bf16 matmul peak (f32 on CPU) measured in the same run;
  train    the trainer's own step (derta_jax.train.state.assemble) on a Llama-3.2-1B-shaped
           model, bf16 compute, seq 1024 and 2048, full fine-tuning and LoRA, remat off and
           on: step time, tokens/s, MFU against the measured and the nominal peak;
  attention  the attention implementation set (model.attention_impl) and what the compiled
           step actually runs, read from its HLO (cuDNN fused attention, Pallas, or XLA);
  attention_parity  what auto runs here (and cuDNN, on a GPU) against XLA's float32 path on
           packed, padded rows: output and gradient errors, next to XLA's own in bf16;
  derta_sft  the same compiled step on a DeRTa batch and on its plain-SFT twin, interleaved:
           the cost of the RTO positions;
  loss_memory  XLA's compiled memory for loss + gradient at V=128256, chunked against
           naive (benchmarks/loss_memory.py's functions, nothing allocated);
  generate greedy generation tokens/s at batch 1 and 32 (derta_jax.models.decode).

    python -m benchmarks.device_check                   # on a GPU or TPU node
    python -m benchmarks.device_check --cpu_smoke       # a laptop: tiny sizes, under a minute
    python -m benchmarks.device_check --sections=peak,train --out=dc.json --overwrite

Everything runs on the first device alone (a 1x1x1x1 mesh): per-chip figures. On a GPU,
XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.90 (BUILD.md's training setting).

A section that fails (an OOM, a kernel XLA cannot compile) is recorded as an error string
and the others still run; the exit status is then 1. The JSON (default device_check.json
in the working directory) is never overwritten without --overwrite (exit 2). Timing
follows benchmarks/timing.py: a warm-up call, medians of interleaved repetitions, and the
1-minute load average before and after (a loaded run's ratios are withheld on stdout,
kept in the JSON with "loaded": true).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback

from derta_jax.models.attention import attention_in_hlo
from derta_jax.models.config import ATTENTION_IMPLS

SECTIONS = ("peak", "attention", "attention_parity", "derta_sft", "train", "loss_memory",
            "generate")
# (batch, seq, heads, kv heads, head dim, sliding window) of the attention parity check:
# lengths that are and are not a multiple of 64, GQA, a window, a head dim of 128
PARITY_SHAPES = ((2, 256, 8, 2, 64, None), (2, 200, 8, 2, 64, None), (2, 256, 8, 4, 128, 64))
GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything that differs between the accelerator run and the CPU smoke."""

    model: str  # "llama_1b" or the preset "tiny"
    seqs: tuple  # (seq, batch) per training length
    full_grid: bool  # every seq x (full, LoRA) x (remat off, on); else each value once
    lora_rank: int
    repeats: int  # timed steps per training entry (after one warm-up)
    matmul: int  # n of the n x n peak matmul
    matmul_count: int  # matmuls per timed call
    loss_shape: tuple  # B, T, V, D of the loss-memory comparison
    loss_chunk: int
    prompt_len: int
    new_tokens: int
    gen_batches: tuple


DEVICE = Sizes("llama_1b", ((1024, 8), (2048, 4)), full_grid=True, lora_rank=96, repeats=5,
               matmul=8192, matmul_count=10, loss_shape=(8, 1024, 128256, 2048),
               loss_chunk=256, prompt_len=128, new_tokens=128, gen_batches=(1, 32))
CPU_SMOKE = Sizes("tiny", ((32, 2), (64, 2)), full_grid=False, lora_rank=8, repeats=2,
                  matmul=256, matmul_count=4, loss_shape=(2, 128, 4096, 64), loss_chunk=32,
                  prompt_len=8, new_tokens=4, gen_batches=(1, 32))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu_smoke", action="store_true", help="tiny sizes (CPU, under a minute)")
    p.add_argument("--out", default="device_check.json", help="the JSON file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=0, help="timed repetitions (0: the sizes')")
    p.add_argument("--attention_impl", default="auto", choices=ATTENTION_IMPLS,
                   help="model.attention_impl of the training steps; auto = the model's "
                        "per-platform choice (models/attention.resolve_attention_impl); an "
                        "explicit cudnn step that fails to compile falls back to xla")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown or not chosen:
        p.error(f"--sections={args.sections}: choose from {','.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in chosen]
    if args.repeats < 0:
        p.error(f"--repeats={args.repeats}: must be >= 0")
    return args


# --- small pure helpers (tested without a run) ----------


def mfu(flops_per_step: float, step_s: float, peak: float):
    """Model FLOP utilisation, None without a peak to divide by."""
    return flops_per_step / step_s / peak if peak and step_s > 0 else None


# --- the model and the steps ----------


def model_config(sizes: Sizes, accelerator: bool):
    """The benchmark's ModelConfig: Llama-3.2-1B's shape (tied embeddings, llama3 rope) on
    an accelerator with bf16 compute, or the tiny preset in float32 for the smoke."""
    from derta_jax.models.config import ModelConfig
    from derta_jax.models.presets import get_preset

    dtype = "bfloat16" if accelerator else "float32"
    if sizes.model == "tiny":
        return get_preset("tiny", dtype=dtype)
    return ModelConfig(
        family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=8192, tie_embeddings=True, bos_token_id=128000,
        eos_token_id=128001, dtype=dtype, scan_layers=True).validate()


@dataclasses.dataclass(frozen=True)
class Entry:
    seq: int
    batch: int
    lora: bool
    remat: str  # "none" | "full"

    @property
    def name(self) -> str:
        return f"seq{self.seq}/{'lora' if self.lora else 'full'}/remat_{self.remat}"


def train_entries(sizes: Sizes) -> list:
    """The training steps to time, full fine-tuning first (the entry attention and
    derta_sft use), then LoRA. The smoke compiles half of them: every seq, mode and remat
    setting once (compiling is most of its time), the accelerator run all combinations."""
    if sizes.full_grid:
        return [Entry(seq, batch, lora, remat) for lora in (False, True)
                for seq, batch in sizes.seqs for remat in ("none", "full")]
    entries = []
    for lora in (False, True):
        for i, (seq, batch) in enumerate(sizes.seqs):
            entries.append(Entry(seq, batch, lora, ("none", "full")[(i + lora) % 2]))
    return entries


class Steps:
    """The compiled training steps of this run, each compiled once and shared by the
    sections (attention, derta_sft, train). One training state lives at a time: the steps of
    one mode (full or LoRA) share its shapes, so the state one step leaves is the next
    one's input, and only a change of mode initialises anew (initialising compiles too)."""

    def __init__(self, sizes: Sizes, base_cfg, attention_impl: str):
        self.sizes, self.base_cfg, self.attention_impl = sizes, base_cfg, attention_impl
        self.compiled: dict = {}
        self.live: dict = {}  # {"lora": bool, "state": TrainState, "frozen": ...}

    def release(self) -> None:
        """Drops the live training state (its device memory) before other sections."""
        self.live = {}

    def config(self, entry: Entry):
        """The trainer's config for `entry`: the paper's numerics (full FT: f32 master
        weights, RTO keep rate 0.05; LoRA: bf16 base, keep rate 1.0, r=96 but 8 in the smoke,
        whose model is narrower than that), one micro-batch."""
        from derta_jax.train.config import default_config

        c = default_config()
        c.data.max_length = entry.seq
        c.train.update(batch_size=entry.batch, micro_batches=1)
        c.loss.rto_keep_rate = 1.0 if entry.lora else 0.05
        c.lora.update(enabled=entry.lora, rank=self.sizes.lora_rank)
        return c

    def get(self, entry: Entry) -> dict:
        """-> {"assembly", "compiled", "attention_impl", "compile_s", ["attention_fallback"]}."""
        if entry.name not in self.compiled:
            self.compiled[entry.name] = self._compile(entry)
        return self.compiled[entry.name]

    def _compile(self, entry: Entry) -> dict:
        import jax

        from derta_jax.train import mesh as mesh_lib
        from derta_jax.train.state import assemble

        mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1},
                                  devices=jax.devices()[:1])
        param_dtype = self.base_cfg.dtype if entry.lora else "float32"
        out = {}
        for impl in dict.fromkeys((self.attention_impl, "xla")):
            cfg = self.base_cfg.replace(remat_policy=entry.remat, attention_impl=impl,
                                        param_dtype=param_dtype)
            start = time.perf_counter()
            try:
                a = assemble(self.config(entry), mesh, total_steps=1000, model_cfg=cfg)
                compiled = a.lower(*a.abstract_inputs()).compile()
            except Exception as err:  # noqa: BLE001  (cuDNN refusing a shape: try XLA's)
                if impl == "xla":
                    raise
                out["attention_fallback"] = f"{impl}: {_one_line(err)}"
                continue
            out.update(assembly=a, compiled=compiled, attention_impl=impl,
                       compile_s=time.perf_counter() - start)
            return out
        raise AssertionError("unreachable")

    def runner(self, entry: Entry, batches: dict) -> tuple[dict, dict]:
        """-> ({name: no-argument callable running one donated step on that batch}, box):
        all callables share the live state; box["loss"] holds the last loss."""
        import jax

        from benchmarks.train_step_setup import to_device

        step = self.get(entry)
        a, compiled = step["assembly"], step["compiled"]
        if self.live.get("lora") is not entry.lora:
            self.live = {}  # the old state's memory goes before the new one is made
            self.live = {"lora": entry.lora, "state": a.init_state(), "frozen": a.load_frozen()}
        box, frozen = self.live, self.live["frozen"]
        placed = {name: jax.device_put(to_device(b), a.batch_sharding)
                  for name, b in batches.items()}

        def make(batch):
            def run():
                box["state"], metrics = compiled(box["state"], frozen, batch)
                box["loss"] = metrics["loss"].block_until_ready()
            return run

        return {name: make(b) for name, b in placed.items()}, box

    def batches(self, entry: Entry) -> tuple[dict, dict]:
        """(DeRTa batch, plain-SFT twin) of full rows (train_step_setup's builder)."""
        from benchmarks.train_step_setup import BenchShape, derta_and_sft_batches

        shape = BenchShape(vocab=self.base_cfg.vocab_size, batch=entry.batch, seq=entry.seq)
        return derta_and_sft_batches(shape, refusal_id=3, prompt_len=max(1, entry.seq // 4))


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _load_info(before: float) -> dict:
    from benchmarks.timing import cores, load1, loaded

    info = {"cores": cores(), "load1_before": before, "load1_after": load1()}
    info["loaded"] = loaded(info)
    return info


# --- sections ----------


def device_section() -> dict:
    import jax

    from derta_jax.train.flops import hbm_bytes_for, peak_flops_for

    dev = jax.devices()[0]
    nominal = peak_flops_for(dev.device_kind)  # 0.0 for a CPU or an unknown kind
    out = {"kind": dev.device_kind, "platform": dev.platform, "count": jax.device_count(),
           "jax": jax.__version__, "nominal_peak_flops": nominal or None,
           "nominal_hbm_bytes": hbm_bytes_for(dev.device_kind) or None}
    try:
        out["bytes_limit"] = (dev.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001  (CPU devices have no memory stats)
        out["bytes_limit"] = None
    return out


def peak_section(sizes: Sizes, accelerator: bool, repeats: int) -> dict:
    """A big jitted matmul, `matmul_count` per timed call: the peak this device reaches on
    the dtype the training step multiplies in."""
    import jax
    import jax.numpy as jnp

    from benchmarks.timing import interleaved_samples, load1

    dtype = jnp.bfloat16 if accelerator else jnp.float32
    n, count = sizes.matmul, sizes.matmul_count
    a = jax.random.normal(jax.random.key(1), (n, n), dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    before = load1()
    wall, _ = interleaved_samples({"matmul": lambda: jax.block_until_ready(
        [dot(a, b) for _ in range(count)])}, max(repeats, 3))
    flops = 2.0 * n**3 * count
    median = statistics.median(wall["matmul"])
    return {"dtype": jnp.dtype(dtype).name, "n": n, "count": count, "median_s": median,
            "measured_flops": flops / median, "best_flops": flops / min(wall["matmul"]),
            "load": _load_info(before)}


def train_section(steps: Steps, entries: list, peak: float, nominal: float, repeats: int) -> dict:
    from benchmarks.timing import interleaved_samples, load1
    from derta_jax.train.flops import training_flops_per_token
    from benchmarks.train_step_setup import xla_cost

    cfg = steps.base_cfg
    rows, errors = [], []
    for entry in entries:
        row = {"name": entry.name, "seq": entry.seq, "batch": entry.batch,
               "mode": "lora" if entry.lora else "full", "remat": entry.remat}
        try:
            step = steps.get(entry)
            a, compiled = step["assembly"], step["compiled"]
            memory = compiled.memory_analysis()  # None where a backend gives none
            derta_batch, _ = steps.batches(entry)
            before = load1()
            fns, box = steps.runner(entry, {"step": derta_batch})
            wall, cpu = interleaved_samples(fns, repeats)
            loss = float(box["loss"])
            rank = a.lora_settings.rank if a.lora_settings else 0
            flops = training_flops_per_token(a.model_cfg, entry.seq, lora=entry.lora,
                                             lora_rank=rank) * entry.batch * entry.seq
            median = statistics.median(wall["step"])
            row.update(
                attention_impl=step["attention_impl"],
                attention_detected=attention_in_hlo(compiled.as_text())[0],
                compile_s=step["compile_s"], step_s=median, step_s_fastest=min(wall["step"]),
                cpu_s=statistics.median(cpu["step"]),
                tokens_per_s=entry.batch * entry.seq / median, model_flops_per_step=flops,
                xla_flops_per_step=_xla_flops(xla_cost, compiled),
                mfu_measured=mfu(flops, median, peak), mfu_nominal=mfu(flops, median, nominal),
                temp_bytes=getattr(memory, "temp_size_in_bytes", None),
                argument_bytes=getattr(memory, "argument_size_in_bytes", None),
                loss=loss, load=_load_info(before))
            if "attention_fallback" in step:
                row["attention_fallback"] = step["attention_fallback"]
            if not math.isfinite(loss):
                row["error"] = f"loss {loss} after {repeats + 1} steps"
        except Exception as err:  # noqa: BLE001  (an OOM here must not stop the next entry)
            steps.release()  # a failed step may have consumed the donated state
            row["error"] = _one_line(err)
        if "error" in row:
            errors.append(f"{entry.name}: {row['error']}")
        rows.append(row)
        _print_train_row(row)
    out = {"model": _model_summary(cfg), "entries": rows}
    if errors:
        out["error"] = "; ".join(errors)
    return out


def _xla_flops(xla_cost, compiled):
    try:
        return xla_cost(compiled)["flops"]
    except Exception:  # noqa: BLE001  (some backends give no cost analysis)
        return None


def attention_section(steps: Steps, entry: Entry) -> dict:
    import jax

    from derta_jax.models.attention import resolve_attention_impl

    step = steps.get(entry)
    detected, evidence = attention_in_hlo(step["compiled"].as_text())
    cfg = steps.base_cfg
    resolved = resolve_attention_impl(step["attention_impl"], jax.default_backend(),
                                      dtype=cfg.dtype, head_dim=cfg.head_dim, seq_len=entry.seq)
    out = {"step": entry.name, "requested": steps.attention_impl,
           "setting": step["attention_impl"], "resolved": resolved,
           "detected": detected, "custom_calls": evidence}
    if "attention_fallback" in step:
        out["fallback"] = step["attention_fallback"]
    return out


def _relative_error(x, ref) -> float:
    import numpy as np

    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def attention_parity_section(accelerator: bool) -> dict:
    """A fast kernel must compute the same function: the attention `auto` runs on this
    device (and cuDNN's, on a GPU, also at lengths auto keeps from it) against XLA's path
    in float32 on the same packed and padded rows, output and q/k/v gradients as
    ||x - ref|| / ||ref||. The yardstick is XLA's path in the compute dtype; auto fails
    the section if its error exceeds three times that (or 1e-4 in float32), or is NaN."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from derta_jax.models.attention import resolve_attention_impl, self_attention

    dtype = jnp.bfloat16 if accelerator else jnp.float32
    dtype_name = jnp.dtype(dtype).name
    rows, failures = [], []
    for b, t, n, kv, hd, window in PARITY_SHAPES:
        keys = jax.random.split(jax.random.key(t * hd + kv), 4)
        q = jax.random.normal(keys[0], (b, t, n, hd), jnp.float32)
        k = jax.random.normal(keys[1], (b, t, kv, hd), jnp.float32)
        v = jax.random.normal(keys[2], (b, t, kv, hd), jnp.float32)
        cotangent = jax.random.normal(keys[3], (b, t, n, hd), jnp.float32)
        segments = np.zeros((b, t), np.int32)  # row 0: two documents and padding; row 1: one
        segments[0, : t // 3], segments[0, t // 3: t - 7] = 1, 2
        segments[1, : t - t // 4] = 1

        def outputs(setting, compute_dtype):
            def f(q, k, v):
                out = self_attention(q.astype(compute_dtype), k.astype(compute_dtype),
                                     v.astype(compute_dtype), segments, window, setting)
                return jnp.sum(out.astype(jnp.float32) * cotangent), out
            (_, out), grads = jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(q, k, v)
            return [out, *grads]

        reference = outputs("xla", jnp.float32)
        row = {"batch": b, "seq": t, "heads": n, "kv_heads": kv, "head_dim": hd,
               "window": window, "dtype": dtype_name}
        candidates = {f"xla_{dtype_name}": "xla", "auto": "auto"}
        if jax.default_backend() == "gpu":
            candidates["cudnn"] = "cudnn"
        for name, setting in candidates.items():
            entry = {"runs": resolve_attention_impl(setting, dtype=dtype, head_dim=hd,
                                                    seq_len=t)}
            try:
                got = outputs(setting, dtype)
            except Exception as err:  # noqa: BLE001  (cuDNN refusing a shape is a finding)
                entry["refused"] = _one_line(err)
                row[name] = entry
                continue
            entry.update({part: _relative_error(x, r) for part, x, r in
                          zip(("out", "dq", "dk", "dv"), got, reference)})
            entry["max"] = max(entry[p] for p in ("out", "dq", "dk", "dv"))
            row[name] = entry
        yardstick = row[f"xla_{dtype_name}"].get("max", 0.0)
        auto = row["auto"]
        bound = max(3 * yardstick, 1e-4)
        if "refused" in auto or not auto["max"] <= bound:  # NaN fails too
            failures.append(f"seq {t} head_dim {hd}: auto ({auto['runs']}) "
                            f"{auto.get('refused') or format(auto['max'], '.2e')} > {bound:.2e}")
        rows.append(row)
    out = {"shapes": rows}
    if failures:
        out["error"] = "; ".join(failures)
    return out


def derta_sft_section(steps: Steps, entry: Entry, repeats: int) -> dict:
    """One compiled step, two batches with the same tokens: DeRTa (half the rows RTO) and
    plain SFT; interleaved, so load hits both alike."""
    from benchmarks.timing import interleaved_samples, load1

    derta_batch, sft_batch = steps.batches(entry)
    before = load1()
    fns, box = steps.runner(entry, {"derta": derta_batch, "sft": sft_batch})
    wall, _ = interleaved_samples(fns, max(repeats, 3))
    derta_s, sft_s = statistics.median(wall["derta"]), statistics.median(wall["sft"])
    return {"step": entry.name, "derta_s": derta_s, "sft_s": sft_s, "ratio": derta_s / sft_s,
            "ratio_fastest": min(wall["derta"]) / min(wall["sft"]), "load": _load_info(before)}


def loss_memory_section(sizes: Sizes) -> dict:
    """XLA's compiled memory of loss + gradient (hidden and unembedding), chunked against
    the naive full log-softmax, on abstract inputs: nothing is allocated."""
    import jax
    import jax.numpy as jnp

    from benchmarks.loss_memory import abstract_batch, chunked_loss_and_grad, naive_loss_and_grad

    b, t, v, d = sizes.loss_shape
    inputs = (jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16),
              jax.ShapeDtypeStruct((d, v), jnp.bfloat16), abstract_batch(b, t),
              jax.ShapeDtypeStruct((2,), jnp.uint32))
    out = {"batch": b, "seq": t, "vocab": v, "width": d, "dtype": "bfloat16",
           "chunk_size": sizes.loss_chunk}
    for name, fn in (("chunked", chunked_loss_and_grad(sizes.loss_chunk)),
                     ("naive", naive_loss_and_grad())):
        start = time.perf_counter()
        stats = jax.jit(fn).lower(*inputs).compile().memory_analysis()
        out[name] = {"temp_bytes": stats.temp_size_in_bytes,
                     "argument_bytes": stats.argument_size_in_bytes,
                     "output_bytes": stats.output_size_in_bytes,
                     "compile_s": time.perf_counter() - start}
    out["naive_over_chunked"] = out["naive"]["temp_bytes"] / max(out["chunked"]["temp_bytes"], 1)
    return out


def generate_section(sizes: Sizes, base_cfg, repeats: int) -> dict:
    """Greedy decoding of exactly `new_tokens` per row (no EOS) from random prompts, with
    the compiled loop of derta_jax.models.decode; weights from the seed, unscanned layers."""
    import numpy as np
    from flax import nnx

    from benchmarks.timing import interleaved_samples, load1
    from derta_jax import weights
    from derta_jax.models.decode import generate

    cfg = base_cfg.replace(param_dtype=base_cfg.dtype, scan_layers=False, remat_policy="none")
    state = weights.abstract_params(cfg)
    nnx.replace_by_pure_dict(state, weights.init_params(cfg, seed=0))
    model = nnx.merge(nnx.split(weights.abstract_model(cfg))[0], state)
    rng = np.random.default_rng(0)
    n = sizes.new_tokens

    def runner(batch):
        prompts = rng.integers(3, cfg.vocab_size, (batch, sizes.prompt_len)).tolist()

        def run():
            out = generate(model, prompts, max_new_tokens=n, eos_token_ids=[], pad_id=0)
            assert all(len(t) == n for t in out.tokens)
        return run

    before = load1()
    wall, _ = interleaved_samples({str(b): runner(b) for b in sizes.gen_batches},
                                  max(repeats, 2))
    del model, state
    return {"prompt_len": sizes.prompt_len, "new_tokens": n, "param_dtype": cfg.param_dtype,
            "batches": {name: {"wall_s": statistics.median(t),
                               "tokens_per_s": int(name) * n / statistics.median(t)}
                        for name, t in wall.items()},
            "load": _load_info(before)}


# --- the run ----------


def _model_summary(cfg) -> dict:
    from derta_jax.weights import param_count

    return {"params": param_count(cfg.replace(scan_layers=True)), "vocab": cfg.vocab_size,
            "hidden": cfg.hidden_size, "layers": cfg.num_layers, "heads": cfg.num_heads,
            "kv_heads": cfg.num_kv_heads, "intermediate": cfg.intermediate_size,
            "dtype": cfg.dtype, "scan_layers": cfg.scan_layers,
            "tie_embeddings": cfg.tie_embeddings}


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _print_train_row(row: dict) -> None:
    if "step_s" not in row:
        print(f"| {row['name']} | error: {row['error']} |", flush=True)
        return
    print(f"| {row['name']} | {row['batch']}x{row['seq']} | {row['compile_s']:.1f} "
          f"| {row['step_s'] * 1e3:.1f} | {row['tokens_per_s']:,.0f} "
          f"| {_fmt(row['mfu_measured'], '.1%')} | {_fmt(row['mfu_nominal'], '.1%')} "
          f"| {row['attention_impl']} -> {row['attention_detected']} "
          f"| {_fmt(row['temp_bytes'] and row['temp_bytes'] / GIB, '.2f')} |"
          f"{' ' + row['error'] if 'error' in row else ''}",
          flush=True)


def _print_section(name: str, result: dict) -> None:
    from benchmarks.timing import ratio_cell

    if name == "train":  # rows were printed as they came
        return
    if "error" in result and "shapes" not in result:  # the parity rows are printed too
        print(f"{name}: ERROR {result['error']}", flush=True)
        return
    if name == "peak":
        print(f"peak: {result['dtype']} matmul {result['n']}^3 x {result['count']}: "
              f"{result['measured_flops'] / 1e12:.2f} TFLOP/s measured (median), best "
              f"{result['best_flops'] / 1e12:.2f}", flush=True)
    elif name == "attention":
        print(f"attention: requested {result['requested']}, set {result['setting']}, compiled "
              f"HLO runs {result['detected']} ({result['step']}; custom calls: "
              f"{', '.join(result['custom_calls']) or 'none'})"
              f"{'; fallback ' + result['fallback'] if 'fallback' in result else ''}", flush=True)
    elif name == "attention_parity":
        def cell(r):
            if "refused" in r:
                return f"refused: {r['refused'][:80]}"
            return f"out {r['out']:.1e} grads {max(r['dq'], r['dk'], r['dv']):.1e}"

        for row in result["shapes"]:
            cells = "; ".join(f"{impl} ({r['runs']}) {cell(r)}"
                              for impl, r in row.items() if isinstance(r, dict))
            print(f"attention_parity: {row['batch']}x{row['seq']} heads {row['heads']}/"
                  f"{row['kv_heads']} dim {row['head_dim']} window {row['window']}: {cells}",
                  flush=True)
        if "error" in result:
            print(f"attention_parity: ERROR {result['error']}", flush=True)
    elif name == "derta_sft":
        print(f"derta_sft: DeRTa {result['derta_s'] * 1e3:.1f} ms, SFT {result['sft_s'] * 1e3:.1f} "
              f"ms per step ({result['step']}); DeRTa/SFT "
              f"{ratio_cell(result['ratio'], result['load']['loaded'], 3, False)}",
              flush=True)
    elif name == "loss_memory":
        c, nv = result["chunked"], result["naive"]
        print(f"loss_memory: B={result['batch']} T={result['seq']} V={result['vocab']} "
              f"D={result['width']} bf16, loss+grad temp: chunked (chunk {result['chunk_size']}) "
              f"{c['temp_bytes'] / GIB:.3f} GiB, naive {nv['temp_bytes'] / GIB:.3f} GiB "
              f"({result['naive_over_chunked']:.1f}x)", flush=True)
    elif name == "generate":
        cells = ", ".join(f"batch {b}: {r['tokens_per_s']:,.0f} tokens/s"
                          for b, r in result["batches"].items())
        print(f"generate: {result['new_tokens']} new tokens after {result['prompt_len']}-token "
              f"prompts; {cells}", flush=True)


def run(args, sizes: Sizes, save=lambda results: None) -> dict:
    """Runs the chosen sections; `save(results)` after each one, so a run cut short (a
    lease that ends, a hung kernel) keeps every section it finished."""
    import jax

    from benchmarks.timing import load1, load_average

    accelerator = jax.default_backend() != "cpu"
    repeats = args.repeats or sizes.repeats
    base_cfg = model_config(sizes, accelerator)
    impl = args.attention_impl
    results = {"command": " ".join(["python -m benchmarks.device_check", *args.argv]),
               "cpu_smoke": args.cpu_smoke, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "load_before": load_average(), "sections": {}}
    load1_before, start = load1(), time.perf_counter()
    device = device_section()
    results["sections"]["device"] = device
    nominal = device["nominal_peak_flops"] or 0.0
    print(f"device: {device['kind']} ({device['platform']}) x {device['count']}, jax "
          f"{device['jax']}; nominal peak "
          f"{f'{nominal / 1e12:.0f} TFLOP/s' if nominal else 'unknown'}; load average "
          f"{results['load_before']}", flush=True)

    steps = Steps(sizes, base_cfg, impl)
    entries = train_entries(sizes)
    first = entries[0]
    sections = {
        "peak": lambda: peak_section(sizes, accelerator, repeats),
        "train": lambda: train_section(
            steps, entries, results["sections"].get("peak", {}).get("measured_flops", 0.0),
            nominal, repeats),
        "attention": lambda: attention_section(steps, first),
        "attention_parity": lambda: attention_parity_section(accelerator),
        "derta_sft": lambda: derta_sft_section(steps, first, repeats),
        "loss_memory": lambda: loss_memory_section(sizes),
        "generate": lambda: generate_section(sizes, base_cfg, repeats),
    }
    for name in args.sections:
        if name == "train":
            print(f"train: {_model_summary(base_cfg)}\n| step | batch x seq | compile s | step ms "
                  f"| tokens/s | MFU (measured peak) | MFU (nominal) | attention set -> HLO "
                  f"| temp GiB |\n|---|---|---|---|---|---|---|---|---|", flush=True)
        if name in ("loss_memory", "generate"):
            steps.release()
        section_start = time.perf_counter()
        try:
            result = sections[name]()
        except Exception as err:  # noqa: BLE001  (one failure must not cost the other sections)
            traceback.print_exc()
            if name in ("attention", "derta_sft", "train"):
                steps.release()
            result = {"error": _one_line(err)}
        result["seconds"] = time.perf_counter() - section_start
        results["sections"][name] = result
        _print_section(name, result)
        save(results)
    info = _load_info(load1_before)
    results.update(load=info, load_after=load_average(), seconds=time.perf_counter() - start,
                   failed=[n for n, r in results["sections"].items() if "error" in r])
    if info["loaded"]:
        print(f"LOADED: the 1-minute load average reached "
              f"{max(info['load1_before'], info['load1_after']):.2f} on {info['cores']} cores: "
              f"the times above are not results (ratios withheld). Rerun on a quiet machine.")
    return results


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    if os.path.exists(args.out) and not args.overwrite:
        print(f"error: --out={args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if not args.cpu_smoke:  # BUILD.md's setting for training on a GPU (before jax starts)
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
    written = []  # this run's own file may be replaced; one that appears meanwhile may not

    def save(results: dict) -> bool:
        if os.path.exists(args.out) and not args.overwrite and not written:
            print(f"error: --out={args.out} appeared during the run; not replaced (pass "
                  f"--overwrite)", file=sys.stderr)
            return False
        tmp = f"{args.out}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({**results, "finished": "failed" in results}, f, indent=2, default=str)
        os.replace(tmp, args.out)
        written.append(True)
        return True

    results = run(args, CPU_SMOKE if args.cpu_smoke else DEVICE, save)
    if not save(results):
        return 2
    failed = results["failed"]
    print(f"wrote {args.out} in {results['seconds']:.0f} s"
          f"{'; FAILED: ' + ', '.join(failed) if failed else ''}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
