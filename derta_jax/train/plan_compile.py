"""Ahead-of-time compile of the REAL train step on abstract inputs, for the planner.

Why: the analytic byte counts in plan_memory say what the state costs; only XLA knows what
the step's activations and temporaries cost after fusion, remat and scheduling, and only
lowering the step with its real shardings proves the sharding is legal. The step is the
trainer's own (derta_jax.train.state.assemble: same optimiser, loss, rules, batch
constraint, donation); the planner feeds it `jax.ShapeDtypeStruct`s instead of arrays and returns XLA's
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

import ml_collections

from derta_jax.models.attention import attention_in_hlo
from derta_jax.train import mesh as mesh_lib
from derta_jax.train.state import assemble


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """Per-device bytes of the compiled step, from XLA's memory_analysis()."""

    argument_bytes: int  # state + frozen params + batch held on entry
    output_bytes: int  # new state + metrics
    alias_bytes: int  # outputs written into donated inputs (counted once)
    temp_bytes: int  # activations, gradients in flight, gathered weights, scratch
    code_bytes: int
    compile_seconds: float
    attention: str = "xla"  # what the compiled step's attention runs on (attention_in_hlo)

    @property
    def peak_bytes(self) -> int:
        """Live bytes at the step's high-water mark, as XLA plans it (donation counted once)."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)


def planned_steps(config: ml_collections.ConfigDict) -> int:
    """The schedule length the planner assumes (the step's program does not depend on it)."""
    return config.train.max_steps if config.train.max_steps > 0 else 1000


def compile_step_memory(config: ml_collections.ConfigDict,
                        devices: Optional[Sequence[Any]] = None) -> CompiledMemory:
    """Lowers and compiles the train step for `devices` (default: jax.devices()); raises the
    sharding error XLA raises if the mesh cannot hold the step."""
    a = assemble(config, mesh_lib.make_mesh(config.mesh, devices), planned_steps(config))
    start = time.perf_counter()
    compiled = a.lower(*a.abstract_inputs()).compile()  # traced under the mesh, as trained
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    return CompiledMemory(
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        code_bytes=int(getattr(stats, "generated_code_size_in_bytes", 0) or 0),
        compile_seconds=seconds,
        attention=attention_in_hlo(compiled.as_text())[0])

