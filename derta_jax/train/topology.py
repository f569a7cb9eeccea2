"""Named accelerator topologies (`v5p-64`, `v5e-16`, `h100x8`) -> device count and memory.

Why: users think in slice names; the planner needs devices, memory per device and peak
FLOP/s. Cloud TPU names count TensorCores for v4 and v5p (two per chip, one JAX device per
chip in megacore mode) and chips for v5e and v6e. GPU names are `<gpu>x<count>`.

`compile_only_devices` gives the devices of a TPU slice for an ahead-of-time compile on a
machine with no TPU (libtpu's topology description, as MaxText's train_compile uses): the
planner then reports TPU XLA's own memory figures instead of XLA:CPU's.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import re
from typing import Optional

from derta_jax.train.flops import hbm_bytes_for, peak_flops_for

# slice prefix -> (device_kind key in flops tables, TensorCores per chip, mesh dims)
TPU_FAMILIES = {
    "v4": ("tpu v4", 2, 3),
    "v5p": ("tpu v5p", 2, 3),
    "v5e": ("tpu v5e", 1, 2),
    "v5litepod": ("tpu v5e", 1, 2),
    "v6e": ("tpu v6e", 1, 2),
}
GPU_KINDS = {"h100": "h100", "h200": "h200", "a100": "a100", "a100-80gb": "a100",
             "a100-40gb": "a100 40gb"}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    device_kind: str
    num_devices: int
    hbm_bytes: int
    peak_flops: float
    tpu_topology: str = ""  # e.g. "v5p:2x2x4", for compile-only devices (libtpu); "" on GPU

    @property
    def is_tpu(self) -> bool:
        return bool(self.tpu_topology)


def _torus(chips: int, dims: int) -> str:
    shape = [1] * dims
    while shape[0] * shape[1] * (shape[2] if dims == 3 else 1) < chips:
        shape[shape.index(min(shape))] *= 2
    ones = [s for s in shape if s == 1]
    return "x".join(str(s) for s in sorted(s for s in shape if s > 1) + ones)


def parse_topology(name: str) -> Topology:
    """`v5p-64` (32 chips), `v4-8`, `v5e-16` / `v5litepod-16`, `v6e-8`, `h100x8`,
    `h200x16`, `a100x8`, `a100-40gbx8`."""
    text = name.strip().lower()
    tpu = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text)
    if tpu:
        kind, cores_per_chip, dims = TPU_FAMILIES[tpu.group(1)]
        count = int(tpu.group(2))
        if count < cores_per_chip or count % cores_per_chip or count & (count - 1):
            raise ValueError(f"--topology={name}: {tpu.group(1)} slices come in powers of two"
                             f"{' of TensorCores (2 per chip)' if cores_per_chip == 2 else ' of chips'}")
        chips = count // cores_per_chip
        family = "v5e" if tpu.group(1) == "v5litepod" else tpu.group(1)
        return Topology(name, kind, chips, hbm_bytes_for(kind), peak_flops_for(kind),
                        f"{family}:{_torus(chips, dims)}")
    gpu = re.fullmatch(r"([a-z0-9-]+?)x(\d+)", text)
    if gpu and gpu.group(1) in GPU_KINDS and int(gpu.group(2)) >= 1:
        kind = GPU_KINDS[gpu.group(1)]
        return Topology(name, kind, int(gpu.group(2)), hbm_bytes_for(kind), peak_flops_for(kind))
    raise ValueError(f"--topology={name}: unknown; use e.g. v5p-64, v4-8, v5e-16, v6e-8, "
                     f"h100x8, h200x8, a100x8, a100-40gbx8")


def libtpu_requirement() -> str:
    """What `jax[tpu]` pins for the installed jax, e.g. 'libtpu==0.0.42.*'."""
    try:
        pins = [r.split(";")[0].strip() for r in importlib.metadata.requires("jax") or ()
                if r.startswith("libtpu")]
    except importlib.metadata.PackageNotFoundError:
        pins = []
    return pins[0].replace(" ", "") if pins else "libtpu"


def libtpu_version() -> Optional[str]:
    """The installed libtpu's version, or None (checked without loading libtpu.so)."""
    if importlib.util.find_spec("libtpu") is None:
        return None
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def compile_only_devices(topology: Topology) -> list:
    """The slice's devices, one per chip, usable for `jit(...).lower(...).compile()` only.

    Raises ImportError naming the package to install when libtpu is missing."""
    if not topology.is_tpu:
        raise ValueError(f"--topology={topology.name}: compile-only devices exist for TPU "
                         f"slices only (e.g. v5p-64)")
    if libtpu_version() is None:
        raise ImportError(f"compiling for --topology={topology.name} needs libtpu, which is not "
                          f"installed: pip install '{libtpu_requirement()}' (no TPU needed)")
    from jax.experimental import topologies

    from derta_jax.train.cluster import tpu_chips_attached

    if not tpu_chips_attached():  # libtpu's one-process lock guards real chips; there are none
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    family = topology.tpu_topology.split(":")[0]
    # v4 / v5p: one JAX device per chip (megacore), as on the real slice; libtpu's default
    # for v4 is one device per TensorCore
    megacore = {"chip_config_name": "megacore"} if TPU_FAMILIES[family][1] == 2 else {}
    devices = list(topologies.get_topology_desc(topology_name=topology.tpu_topology,
                                                platform="tpu", **megacore).devices)
    if len(devices) != topology.num_devices:
        raise ValueError(f"--topology={topology.name}: libtpu describes {topology.tpu_topology} "
                         f"with {len(devices)} devices, expected {topology.num_devices}")
    return devices
