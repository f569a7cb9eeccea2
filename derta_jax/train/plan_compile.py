"""Ahead-of-time compile of the REAL train step on abstract inputs, for the planner.

Why: the analytic byte counts in plan_memory say what the state costs; only XLA knows what
the step's activations and temporaries cost after fusion, remat and scheduling, and only
lowering the step with its real shardings proves the sharding is legal. This module builds
the step exactly as derta_jax.train.loop does (same optimiser, loss config, rules, batch
constraint, donation), feeds `jax.ShapeDtypeStruct`s instead of arrays, and returns XLA's
`memory_analysis()` of the compiled program. Nothing the size of the model is allocated.

The devices may be fake CPU devices (`--xla_force_host_platform_device_count`) or, where
libtpu is installed, compile-only devices of a TPU topology description
(derta_jax.train.topology.compile_only_devices, as MaxText's train_compile does).
Figures from CPU compiles are CPU's fusion decisions: a guide to TPU/GPU temporaries, not
a measurement of them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from derta_jax.train import lora, mesh as mesh_lib
from derta_jax.train.config import build_model_config
from derta_jax.train.loop import loss_config, opt_state_shardings
from derta_jax.train.optimizer import make_optimizer
from derta_jax.train.plan_memory import abstract_parts
from derta_jax.train.step import BATCH_KEYS, TrainState, make_train_step

BATCH_DTYPES = {"input_ids": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.bool_,
                "rto_mask": jnp.bool_, "positions": jnp.int32, "segment_ids": jnp.int32}


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """Per-device bytes of the compiled step, from XLA's memory_analysis()."""

    argument_bytes: int  # state + frozen params + batch held on entry
    output_bytes: int  # new state + metrics
    alias_bytes: int  # outputs written into donated inputs (counted once)
    temp_bytes: int  # activations, gradients in flight, gathered weights, scratch
    code_bytes: int
    compile_seconds: float

    @property
    def peak_bytes(self) -> int:
        """Live bytes at the step's high-water mark, as XLA plans it (donation counted once)."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)


def _with_sharding(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def abstract_step_inputs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """(step function, in shardings, out shardings, abstract (state, frozen, batch)) exactly
    as the loop builds them: full fine-tuning, or LoRA adapters over a frozen base."""
    model_cfg = build_model_config(config)
    graphdef, trained, frozen_base, rest = abstract_parts(config, model_cfg)
    param_shardings = nnx.to_pure_dict(mesh_lib.state_shardings(trained, mesh))
    abstract_pure = nnx.to_pure_dict(trained)
    total_steps = config.train.max_steps if config.train.max_steps > 0 else 1000
    optimizer = make_optimizer(config.optim, total_steps)
    opt_shardings = opt_state_shardings(optimizer, abstract_pure, param_shardings, mesh)
    rep = mesh_lib.replicated(mesh)
    state_shardings = TrainState(rep, param_shardings, opt_shardings, rep)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    micro_spec = NamedSharding(mesh, PartitionSpec(*batch_sharding.spec))

    def constrain(micro_batch):
        return {k: jax.lax.with_sharding_constraint(v, micro_spec) for k, v in micro_batch.items()}

    prepare_model = None
    if config.lora.enabled and config.lora.dropout > 0:
        prepare_model = lora.set_dropout_keys
    step_fn = make_train_step(graphdef, optimizer, loss_config(config), config.train.micro_batches,
                              aux_loss_coef=model_cfg.router_aux_loss_coef,
                              micro_batch_constraint=constrain, prepare_model=prepare_model)
    if frozen_base is None:
        frozen_shardings, frozen = None, nnx.to_pure_dict(rest)
    else:
        frozen_shardings = nnx.to_pure_dict(mesh_lib.state_shardings(frozen_base, mesh))
        frozen = _with_sharding(nnx.to_pure_dict(frozen_base), frozen_shardings)
    batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
    abstract_state = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        _with_sharding(abstract_pure, param_shardings),
        _with_sharding(jax.eval_shape(optimizer.init, abstract_pure), opt_shardings),
        jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep))
    shape = (config.train.batch_size, config.data.max_length)
    abstract_batch = {k: jax.ShapeDtypeStruct(shape, BATCH_DTYPES[k], sharding=batch_sharding)
                      for k in BATCH_KEYS}
    in_shardings = (state_shardings, frozen_shardings, batch_shardings)
    return step_fn, in_shardings, (state_shardings, None), (abstract_state, frozen, abstract_batch)


def compile_step_memory(config: ml_collections.ConfigDict,
                        devices: Optional[Sequence[Any]] = None) -> CompiledMemory:
    """Lowers and compiles the train step for `devices` (default: jax.devices()); raises the
    sharding error XLA raises if the mesh cannot hold the step."""
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    step_fn, in_shardings, out_shardings, args = abstract_step_inputs(config, mesh)
    jitted = jax.jit(step_fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=(0,))
    start = time.perf_counter()
    with jax.set_mesh(mesh):  # traced as the trainer traces it (MoE dispatch per shard)
        compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    return CompiledMemory(
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        code_bytes=int(getattr(stats, "generated_code_size_in_bytes", 0) or 0),
        compile_seconds=seconds)

