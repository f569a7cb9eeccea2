"""`python -m derta_jax.plan --config=configs/X.py [--mesh=data:1,fsdp:8] [--topology=v5p-64]
    [--eval --batch_size=64 --max_new_tokens=512 [--prompt_len=N]]`

Says, before a pod is rented, whether a run fits and how long a step should take, without
allocating the model:

  * parameters, and bytes per device of parameters, gradients and Adam state, from
    `nnx.eval_shape` and the trainer's own sharding rules (derta_jax.train.plan_memory);
  * activations and temporaries from an ahead-of-time compile of the REAL train step
    (derta_jax.train.plan_compile), which also proves the sharding is legal: for a TPU
    `--topology` on the slice's own compile-only devices when libtpu is installed (no TPU
    needed: `pip install libtpu==0.0.42.*`), otherwise on fake CPU devices;
  * whether that fits the device's memory, the micro-batch split, the step time and MFU
    at an assumed MFU, and the FSDP communication volume per step.

The CLI sets `--xla_force_host_platform_device_count` for itself before JAX starts, so the
compile sees as many (fake) devices as the plan asks for. Config mistakes (a mesh whose
product is not the device count, a batch that does not divide) fail with the config's own
error naming the field, exactly as the trainer would fail on the pod.

With --eval it plans evaluation of the same model on the same mesh instead
(derta_jax.train.plan_decode): weights and KV cache per device, and the prefill and
decode programs of derta_jax.models.decode compiled for the topology.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from typing import Any, Optional

from absl import app, flags
from ml_collections import config_flags

from derta_jax import cli_flags
from derta_jax.train.config import MESH_AXES  # plain data: importing it starts no JAX backend

GIB = 2.0**30

_CONFIG = config_flags.DEFINE_config_file("config", None, "A recipe file in configs/.")
_MESH = flags.DEFINE_string("mesh", "", "Mesh axis sizes, e.g. data:1,fsdp:8,tensor:1,expert:1 "
                            "(axes not named keep the config's value; -1 = the rest).")
_TOPOLOGY = flags.DEFINE_string("topology", "", "Target slice: v5p-64, v4-8, v5e-16, v6e-8, "
                                "h100x8, h200x8, a100x8, a100-40gbx8.")
_DEVICES = flags.DEFINE_integer("devices", 0, "Device count (default: the topology's, or the "
                                "mesh product).")
_COMPILE = flags.DEFINE_boolean("compile", True, "AOT-compile the train step for XLA's "
                                "activation/temporary figures.")
_COMPILE_ON = flags.DEFINE_enum("compile_on", "auto", ["auto", "tpu", "cpu"],
                                "tpu: the TPU --topology's compile-only devices (needs libtpu); "
                                "cpu: fake CPU devices; auto: tpu when libtpu is installed and "
                                "the topology is a TPU slice, else cpu.")
_MFU = flags.DEFINE_float("mfu", 0.4, "Assumed model FLOPs utilisation for the step time.")
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "json"], "Output format.")
_EVAL = flags.DEFINE_boolean("eval", False, "Plan evaluation instead of training: weights + "
                             "KV cache per device, and the decode programs compiled.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "--eval: prompts decoded together.")
_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 512, "--eval: tokens generated per prompt.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 0, "--eval: prompt tokens (padded width; "
                                   "default: the config's data.max_length).")


class PlanError(ValueError):
    """Bad planner flags (the config's own errors are ConfigError)."""


def plan_device_count(config: Any, topology_devices: int, devices: int) -> int:
    """The device count the plan is for: --devices, else the topology's, else the mesh product
    with any -1 ("the rest") axis at 1, i.e. the smallest machine the mesh allows."""
    if devices and topology_devices and devices != topology_devices:
        raise PlanError(f"--devices={devices} but the topology has {topology_devices} devices")
    count = devices or topology_devices
    if count:
        return count
    return math.prod(max(int(config.mesh[a]), 1) for a in MESH_AXES)


def compile_target(choice: str, topology: Optional[Any]) -> tuple:
    """(--compile_on resolved to 'tpu' or 'cpu', notes for the user)."""
    from derta_jax.train.topology import libtpu_requirement, libtpu_version

    is_tpu = topology is not None and topology.is_tpu
    if choice == "cpu":
        return "cpu", []
    if choice == "tpu" and not is_tpu:
        raise PlanError("--compile_on=tpu needs a TPU --topology (e.g. v5p-64)")
    if choice not in ("auto", "tpu"):
        raise PlanError(f"--compile_on={choice}: use auto, tpu or cpu")
    if is_tpu and (choice == "tpu" or libtpu_version() is not None):
        return "tpu", []
    notes = []
    if is_tpu:
        notes.append(f"libtpu is not installed, so the step was compiled on fake CPU devices; "
                     f"pip install '{libtpu_requirement()}' compiles it for the real "
                     f"{topology.tpu_topology} slice (no TPU needed)")
    return "cpu", notes


def _has_data_source(config: Any) -> bool:
    d = config.data
    return bool(d.train_files or d.triples or d.helpful or d.synthetic or d.sources.strip())


def make_plan(config: Any, num_devices: int, topology: Optional[Any] = None, *,
              compile_step: bool = True, compile_on: str = "cpu", mfu: float = 0.4) -> dict:
    """The plan as plain data (see the module docstring). Raises ConfigError on bad configs.
    `compile_on` is --compile_on; the default keeps library callers on fake CPU devices."""
    from derta_jax.train import flops, plan_memory
    from derta_jax.train.config import build_model_config, resolve_mesh_shape, validate

    config = copy.deepcopy(config)
    notes = []
    if not _has_data_source(config):
        notes.append("no data source is set (data.sources / data.train_files / data.triples / "
                     "data.helpful); "
                     "the trainer needs one, the plan does not")
        config.data.synthetic = True
    validate(config, num_devices)
    sizes = resolve_mesh_shape(config.mesh, num_devices)
    for axis, size in sizes.items():
        config.mesh[axis] = size
    model_cfg = build_model_config(config)
    mesh = plan_memory.abstract_mesh(sizes)
    state = plan_memory.state_memory(config, model_cfg, mesh)
    split = plan_memory.batch_split(config, sizes)
    activations = plan_memory.activation_bytes_estimate(
        model_cfg, split.seqs_per_device, split.seq_len, config.loss.chunk_size, sizes["tensor"])
    batch_bytes = plan_memory.batch_bytes_per_device(split)
    plan = {
        "config": {"preset": config.model.preset, "lora": bool(config.lora.enabled),
                   "param_dtype": model_cfg.param_dtype, "dtype": model_cfg.dtype,
                   "remat_policy": model_cfg.remat_policy, "scan_layers": model_cfg.scan_layers},
        "devices": num_devices, "mesh": sizes,
        "params": state.param_count, "trained_params": state.trained_count,
        "per_device": {"params": state.params_bytes, "grads": state.grads_bytes,
                       "optimizer": state.opt_bytes, "batch": batch_bytes,
                       "activations_estimate": activations},
        "batch": {"global": split.global_batch, "micro_batches": split.micro_batches,
                  "batch_devices": split.batch_devices, "seqs_per_device": split.seqs_per_device,
                  "seq_len": split.seq_len, "tokens_per_step": split.tokens_per_step},
        "comm_bytes_per_device": dataclass_dict(plan_memory.comm_volume(state, sizes, split.micro_batches)),
        "notes": notes,
    }
    plan["per_device"]["analytic_peak"] = state.total_bytes + activations + batch_bytes
    peak = plan["per_device"]["analytic_peak"]
    if compile_step:
        from derta_jax.train import plan_compile

        devices, backend = _compile_devices(compile_on, topology, num_devices, notes)
        compiled = plan_compile.compile_step_memory(config, devices)
        plan["compiled"] = dict(dataclass_dict(compiled), peak_bytes=compiled.peak_bytes,
                                backend=backend)
        peak = compiled.peak_bytes
        notes += _cpu_bf16_notes(backend, model_cfg)
    plan["per_device"]["peak"] = peak
    if topology is not None:
        _fit(plan, topology, peak)
        plan["fits_analytic"] = plan["per_device"]["analytic_peak"] <= topology.hbm_bytes
        if not topology.is_tpu:
            notes.append("GPU: JAX preallocates 75% of memory by default; set "
                         "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 to use what the plan counts")
        lora_rank = config.lora.rank if config.lora.enabled else 0
        per_token = flops.training_flops_per_token(model_cfg, split.seq_len,
                                                   lora=bool(lora_rank), lora_rank=lora_rank)
        step_flops = per_token * split.tokens_per_step
        seconds = step_flops / (num_devices * topology.peak_flops * mfu)
        plan["speed"] = {"flops_per_token": per_token, "flops_per_step": step_flops,
                         "assumed_mfu": mfu, "step_seconds": seconds,
                         "tokens_per_second": split.tokens_per_step / seconds}
    return plan


def make_eval_plan(config: Any, num_devices: int, topology: Optional[Any] = None, *,
                   batch_size: int = 64, max_new_tokens: int = 512, prompt_len: int = 0,
                   compile_decode: bool = True, compile_on: str = "cpu") -> dict:
    """The evaluation plan as plain data: the merged model (LoRA adapters merged, as
    evaluate loads it) on the config's mesh, decoding `batch_size` prompts of `prompt_len`
    tokens (default data.max_length) to `max_new_tokens` more."""
    from derta_jax.train import plan_decode
    from derta_jax.train.config import build_model_config, resolve_mesh_shape
    from derta_jax.train.plan_memory import abstract_mesh

    for flag, value in (("--batch_size", batch_size), ("--max_new_tokens", max_new_tokens)):
        if value < 1:
            raise PlanError(f"{flag}={value}: must be >= 1")
    if prompt_len < 0:
        raise PlanError(f"--prompt_len={prompt_len}: must be >= 0")
    config = copy.deepcopy(config)
    sizes = resolve_mesh_shape(config.mesh, num_devices)
    model_cfg = build_model_config(config)
    prompt_len = prompt_len or int(config.data.max_length)
    if prompt_len + max_new_tokens > model_cfg.max_position_embeddings:
        raise PlanError(f"--prompt_len + --max_new_tokens = {prompt_len + max_new_tokens}: "
                        f"above the model's max_position_embeddings "
                        f"({model_cfg.max_position_embeddings})")
    shape = plan_decode.decode_shape(batch_size, prompt_len, max_new_tokens, sizes)
    memory = plan_decode.decode_memory(model_cfg, abstract_mesh(sizes), shape)
    notes = []
    if shape.rows != batch_size:
        notes.append(f"--batch_size={batch_size} is padded to {shape.rows} rows, a multiple "
                     f"of the batch shards (data x fsdp)")
    plan = {"mode": "eval",
            "config": {"preset": config.model.preset, "lora": bool(config.lora.enabled),
                       "param_dtype": model_cfg.param_dtype, "dtype": model_cfg.dtype},
            "devices": num_devices, "mesh": sizes, "params": memory["params"],
            "decode": {"batch": batch_size, "rows": shape.rows, "prompt_len": prompt_len,
                       "max_new_tokens": max_new_tokens, "cache_len": shape.cache_len},
            "per_device": {"weights": memory["weights_bytes"],
                           "kv_cache": memory["kv_cache_bytes"]},
            "total": {"weights": memory["weights_bytes_total"],
                      "kv_cache": memory["kv_cache_bytes_total"]},
            "notes": notes}
    peak = plan["per_device"]["analytic_peak"] = memory["weights_bytes"] + memory["kv_cache_bytes"]
    if compile_decode:
        from derta_jax.train import mesh as mesh_lib

        devices, backend = _compile_devices(compile_on, topology, num_devices, notes)
        compiled = plan_decode.compile_decode_memory(
            model_cfg, mesh_lib.make_mesh(sizes, devices), shape)
        plan["compiled"] = dict(compiled, backend=backend)
        peak = max(c["peak_bytes"] for c in compiled.values())
        notes += _cpu_bf16_notes(backend, model_cfg)
    plan["per_device"]["peak"] = peak
    if topology is not None:
        _fit(plan, topology, peak)
    return plan


def _fit(plan: dict, topology: Any, peak: int) -> None:
    """The topology, and whether `peak` bytes per device fit its memory, into `plan`."""
    plan["topology"] = {"name": topology.name, "device_kind": topology.device_kind,
                        "hbm_bytes": topology.hbm_bytes, "peak_flops": topology.peak_flops}
    plan["fits"] = peak <= topology.hbm_bytes
    plan["headroom_bytes"] = topology.hbm_bytes - peak


def _cpu_bf16_notes(backend: str, model_cfg: Any) -> list:
    if backend.startswith("cpu") and "bfloat16" in (model_cfg.param_dtype, model_cfg.dtype):
        return ["XLA:CPU runs bf16 matmuls in f32 and may keep an f32 copy of bf16 weights "
                "(up to 2x their bytes) that TPU/GPU do not: the compiled peak is an upper "
                "bound, the analytic total a lower one"]
    return []


def _compile_devices(compile_on: str, topology: Optional[Any], num_devices: int,
                     notes: list) -> tuple:
    """(devices to compile for, their description): a TPU topology's compile-only devices
    or fake CPU devices (see compile_target)."""
    import jax

    from derta_jax.train.topology import compile_only_devices, libtpu_version

    target, target_notes = compile_target(compile_on, topology)
    notes += target_notes
    if target == "tpu":
        return (compile_only_devices(topology),
                f"tpu {topology.tpu_topology} compile-only devices, libtpu {libtpu_version()}")
    devices = jax.devices("cpu")
    if len(devices) < num_devices:
        raise PlanError(f"the plan needs {num_devices} devices but JAX has {len(devices)} "
                        f"CPU devices: run `python -m derta_jax.plan`, which sets "
                        f"XLA_FLAGS=--xla_force_host_platform_device_count for itself")
    return devices[:num_devices], "cpu (fake devices)"


def dataclass_dict(obj: Any) -> dict:
    import dataclasses

    return dataclasses.asdict(obj) | ({"total": obj.total} if hasattr(obj, "total") else {})


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def _device_lines(plan: dict) -> list:
    if "topology" not in plan:
        return []
    t = plan["topology"]
    return [f"device       {t['name']}: {t['device_kind']}, {_gib(t['hbm_bytes'])} each"]


def render_eval(plan: dict) -> str:
    """The evaluation plan as the screen the user reads."""
    c, d, e, t = plan["config"], plan["per_device"], plan["decode"], plan["total"]
    mesh = ",".join(f"{a}:{s}" for a, s in plan["mesh"].items())
    lines = [f"model        {c['preset'] or 'custom'}{' (LoRA merged)' if c['lora'] else ''}: "
             f"{plan['params'] / 1e9:.3f} B parameters (params {c['param_dtype']}, "
             f"compute {c['dtype']})",
             f"mesh         {mesh} on {plan['devices']} devices",
             f"decode       {e['rows']} rows x ({e['prompt_len']} prompt + {e['max_new_tokens']} "
             f"new tokens) = KV cache of {e['cache_len']} slots"]
    lines += _device_lines(plan)
    lines += ["per device   (analytic: the trainer's shardings, the decoder's KV cache shardings)",
              f"  weights      {_gib(d['weights'])}   (of {_gib(t['weights'])})",
              f"  KV cache     {_gib(d['kv_cache'])}   (of {_gib(t['kv_cache'])})",
              f"  total        {_gib(d['analytic_peak'])}"]
    for name, k in plan.get("compiled", {}).items():
        if name == "backend":
            continue
        lines.append(f"compiled     {name} (XLA memory_analysis, {plan['compiled']['backend']}, "
                     f"{k['compile_seconds']:.1f} s): arguments {_gib(k['argument_bytes'])}, "
                     f"temporaries {_gib(k['temp_bytes'])}, peak {_gib(k['peak_bytes'])}")
    if "fits" in plan:
        head, hbm = plan["headroom_bytes"], plan["topology"]["hbm_bytes"]
        verdict = (f"FITS, headroom {_gib(head)} ({100 * head / hbm:.0f}% of HBM)" if plan["fits"]
                   else f"DOES NOT FIT: short by {_gib(-head)}")
        lines.append(f"memory       {_gib(d['peak'])} of {_gib(hbm)}: {verdict}")
    lines += [f"note         {n}" for n in plan["notes"]]
    return "\n".join(lines)


def render(plan: dict) -> str:
    """The plan as the screen the user reads."""
    if plan.get("mode") == "eval":
        return render_eval(plan)
    c, d, b = plan["config"], plan["per_device"], plan["batch"]
    mesh = ",".join(f"{a}:{s}" for a, s in plan["mesh"].items())
    lines = [f"model        {c['preset'] or 'custom'}{' + LoRA' if c['lora'] else ''}: "
             f"{plan['params'] / 1e9:.3f} B parameters, {plan['trained_params'] / 1e9:.3f} B trained "
             f"(params {c['param_dtype']}, compute {c['dtype']}, remat {c['remat_policy']}, "
             f"scan_layers {c['scan_layers']})",
             f"mesh         {mesh} on {plan['devices']} devices"]
    lines += _device_lines(plan)
    lines += ["per device   (analytic, from eval_shape + the trainer's shardings)",
              f"  params       {_gib(d['params'])}",
              f"  grads        {_gib(d['grads'])}   (accumulator + one micro-batch)",
              f"  optimizer    {_gib(d['optimizer'])}   (Adam mu + nu)",
              f"  batch        {_gib(d['batch'])}",
              f"  activations  {_gib(d['activations_estimate'])}   (rough estimate)",
              f"  total        {_gib(d['analytic_peak'])}"]
    if "compiled" in plan:
        k = plan["compiled"]
        lines += [f"compiled     (XLA memory_analysis, {k['backend']}, {k['compile_seconds']:.1f} s; "
                  f"attention: {k.get('attention', 'xla')})",
                  f"  arguments    {_gib(k['argument_bytes'])}   (state + frozen + batch)",
                  f"  temporaries  {_gib(k['temp_bytes'])}   (activations, gradients, gathered weights)",
                  f"  outputs      {_gib(k['output_bytes'])}   ({_gib(k['alias_bytes'])} in donated buffers)",
                  f"  peak         {_gib(k['peak_bytes'])}"]
    if "fits" in plan:
        head, hbm = plan["headroom_bytes"], plan["topology"]["hbm_bytes"]
        verdict = (f"FITS, headroom {_gib(head)} ({100 * head / hbm:.0f}% of HBM)" if plan["fits"]
                   else f"DOES NOT FIT: short by {_gib(-head)}")
        lines.append(f"memory       {_gib(d['peak'])} of {_gib(hbm)}: {verdict}")
        if plan["fits_analytic"] != plan["fits"]:
            lines.append(f"             the analytic total ({_gib(d['analytic_peak'])}) "
                         f"{'fits' if plan['fits_analytic'] else 'does not fit'}")
    lines.append(f"batch        {b['global']} sequences x {b['seq_len']} tokens = {b['micro_batches']} "
                 f"micro-batches x {b['seqs_per_device']} sequences per device on "
                 f"{b['batch_devices']} batch devices")
    if "speed" in plan:
        s = plan["speed"]
        lines.append(f"speed        {s['flops_per_step']:.3g} FLOPs/step; at an ASSUMED MFU of "
                     f"{100 * s['assumed_mfu']:.0f}%: {s['step_seconds']:.2f} s/step, "
                     f"{s['tokens_per_second']:,.0f} tokens/s (padded tokens)")
    v = plan["comm_bytes_per_device"]
    lines.append(f"comm/step    {_gib(v['total'])} per device: FSDP all-gather {_gib(v['fsdp_all_gather'])}, "
                 f"reduce-scatter {_gib(v['fsdp_reduce_scatter'])}, data all-reduce "
                 f"{_gib(v['data_all_reduce'])}  [M (2W + G)(n-1)/n + 2 (G/n)(d-1)/d]")
    lines += [f"note         {n}" for n in plan["notes"]]
    return "\n".join(lines)


def main(argv):
    del argv  # cli_flags refuses positional arguments
    import logging

    logging.getLogger("jax._src").setLevel(logging.WARNING)  # "no libtpu" is not news here
    from derta_jax.train.config import ConfigError
    from derta_jax.train.topology import parse_topology

    try:
        config = copy.deepcopy(_CONFIG.value)
        from derta_jax.train.mesh import parse_mesh

        for axis, size in parse_mesh(_MESH.value).items():
            config.mesh[axis] = size
        topology = parse_topology(_TOPOLOGY.value) if _TOPOLOGY.value else None
        count = plan_device_count(config, topology.num_devices if topology else 0, _DEVICES.value)
        if count < 1:
            raise PlanError(f"--devices={count}: must be >= 1")
        from derta_jax.train.mesh import use_host_cpu_devices

        use_host_cpu_devices(count)  # JAX's backends are not started yet
        if _EVAL.value:
            plan = make_eval_plan(config, count, topology, batch_size=_BATCH.value,
                                  max_new_tokens=_NEW_TOKENS.value, prompt_len=_PROMPT_LEN.value,
                                  compile_decode=_COMPILE.value, compile_on=_COMPILE_ON.value)
        else:
            plan = make_plan(config, count, topology, compile_step=_COMPILE.value,
                             compile_on=_COMPILE_ON.value, mfu=_MFU.value)
        if not (_DEVICES.value or topology) and -1 in [int(config.mesh[a]) for a in MESH_AXES]:
            plan["notes"].insert(0, f"no --devices or --topology: planned for {count} device(s), "
                                    f"the -1 mesh axis at 1")
    except (ConfigError, PlanError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(plan, indent=2) if _FORMAT.value == "json" else render(plan))


def cli() -> None:
    """The console-script entry point (pyproject [project.scripts]), = python -m."""
    app.run(main, flags_parser=cli_flags.config_parser(_CONFIG))


if __name__ == "__main__":
    cli()
