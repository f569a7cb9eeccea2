"""The device mesh of a run: four named axes (data, fsdp, tensor, expert) over the devices.

How arrays are laid out on it (the logical-axis rules) is derta_jax/models/sharding.py;
this module makes the mesh from a run's config and keeps commands that only prepare off
accelerators.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional, Sequence

import jax
from jax.sharding import Mesh

from derta_jax.train.config import MESH_AXES, resolve_mesh_shape


def parse_mesh(text: str) -> dict:
    """--mesh=data:1,fsdp:8 -> {"data": 1, "fsdp": 8} (only the axes named; -1 = the rest)."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\w+)[:=](-?\d+)", part)
        if not match or match.group(1) not in MESH_AXES:
            raise ValueError(f"--mesh={text}: {part!r} is not AXIS:SIZE with AXIS in {MESH_AXES}")
        sizes[match.group(1)] = int(match.group(2))
    return sizes


def use_host_cpu_devices(count: int) -> None:
    """Before JAX's backends start: this process computes on `count` host CPU devices only.

    For the commands that only prepare (the planner, convert): they must not take a GPU's
    memory or a TPU VM's chips, which a trainer may be using (and which, on one worker of a
    pod slice, would wait for the rest); `count` fake devices give them a mesh to lay
    arrays out on (TPU compile-only devices come from libtpu directly)."""
    flag = f"--xla_force_host_platform_device_count={count}"
    current = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                     os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = f"{current} {flag}".strip()
    jax.config.update("jax_platforms", "cpu")


def make_mesh(mesh_config: Mapping[str, int], devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A Mesh with the four named axes; `mesh_config` may hold -1 for 'the rest'.

    `jax.make_mesh` orders devices by the physical topology (TPU torus, GPU NVLink islands),
    so that the innermost axes get the fastest links; plain reshaping would not."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
