"""Self-attention on CPU through a fused C++ kernel (cpu_flash.cc), forward and backward.

Why: XLA:CPU materialises every block of [B, N, T, S] scores and runs the mask, softmax and
their gradients as separate loops; attention was the whole gap between our CPU training
step and PyTorch's, whose fused flash kernel keeps a block of scores in cache
(BENCHMARKS.md). The kernel does the same, with models/attention.py's mask rule (segments,
causal, optional sliding window) and GQA; the backward recomputes the probabilities from
the saved log-sum-exp (FlashAttention-2), so no [T, S] array is ever stored.

The kernel is compiled on first use with the machine's C++ compiler (`$CXX`, else `c++`,
`g++` or `clang++`) against the XLA FFI headers jaxlib ships, into a cache keyed by the
source, the flags, jax's version and the CPU (`$DERTA_JAX_CACHE`, else
`~/.cache/derta_jax/kernels`). Without a compiler `available()` is False and "auto" keeps
the pure-JAX "chunked" attention; `model.attention_impl=cpu_flash` then says why it cannot
run. Computation is float32: other dtypes are cast at the boundary.

Sharding: a custom call, like the splash kernel, so it runs per device under shard_map
(`sharding.per_device_attention`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from derta_jax.models.sharding import per_device_attention

SOURCE = Path(__file__).with_name("cpu_flash.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-w")
FORWARD, BACKWARD = "derta_cpu_flash_forward", "derta_cpu_flash_backward"


class KernelUnavailable(RuntimeError):
    """The C++ kernel could not be built here (no compiler, or the compile failed)."""


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def cache_dir() -> Path:
    root = os.environ.get("DERTA_JAX_CACHE") or Path.home() / ".cache" / "derta_jax"
    return Path(root) / "kernels"


def _build() -> str:
    """Path of the compiled kernel (built once per source/flags/jax/CPU); raises
    KernelUnavailable with the compiler's message when it cannot be built."""
    compiler = _compiler()
    if compiler is None:
        raise KernelUnavailable("no C++ compiler found ($CXX, c++, g++ or clang++)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), compiler,
                                    jax.__version__, _cpu_signature()]).encode()).hexdigest()
    target = cache_dir() / f"cpu_flash-{key[:20]}.so"
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        scratch = Path(tmp) / target.name
        try:
            done = subprocess.run([compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o",
                                   str(scratch)], capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise KernelUnavailable(f"{compiler} could not build {SOURCE.name}: {error}")
        if done.returncode != 0:
            raise KernelUnavailable(f"{compiler} failed on {SOURCE.name}:\n{done.stderr[-2000:]}")
        os.replace(scratch, target)  # atomic: concurrent builders leave one whole file
    return str(target)


@functools.lru_cache(maxsize=None)
def _load() -> Optional[str]:
    """Builds (once) and registers the kernel's two FFI targets; -> None, or why it cannot
    (kept: a failed build is not retried at every trace)."""
    try:
        library = ctypes.cdll.LoadLibrary(_build())
    except (KernelUnavailable, OSError) as error:
        return str(error)
    jax.ffi.register_ffi_target(FORWARD, jax.ffi.pycapsule(library.DertaCpuFlashForward),
                                platform="cpu")
    jax.ffi.register_ffi_target(BACKWARD, jax.ffi.pycapsule(library.DertaCpuFlashBackward),
                                platform="cpu")
    return None


def available() -> bool:
    """Whether the kernel is built (or can be) and registered on this machine."""
    return _load() is None


def why_unavailable() -> Optional[str]:
    return _load()


def _attrs(q, window: Optional[int]) -> dict:
    return dict(window=np.int64(window or 0), scale=np.float32(1.0 / np.sqrt(q.shape[-1])))


def _forward(q, k, v, segment_ids, window):
    b, t, n, _ = q.shape
    out, lse = jax.ffi.ffi_call(
        FORWARD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                  jax.ShapeDtypeStruct((b, n, t), jnp.float32)))(
        q, k, v, segment_ids, **_attrs(q, window))
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, segment_ids, window):
    return _forward(q, k, v, segment_ids, window)[0]


def _attend_fwd(q, k, v, segment_ids, window):
    out, lse = _forward(q, k, v, segment_ids, window)
    return out, (q, k, v, segment_ids, out, lse)


def _attend_bwd(window, residuals, dout):
    q, k, v, segment_ids, out, lse = residuals
    dq, dk, dv = jax.ffi.ffi_call(
        BACKWARD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                   jax.ShapeDtypeStruct(k.shape, jnp.float32),
                   jax.ShapeDtypeStruct(v.shape, jnp.float32)))(
        q, k, v, segment_ids, out, lse, dout.astype(jnp.float32), **_attrs(q, window))
    return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _attend_one_device(q, k, v, segment_ids, sliding_window):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    return _attend(*f32, segment_ids.astype(jnp.int32), sliding_window).astype(q.dtype)


def cpu_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                        sliding_window: Optional[int]) -> jax.Array:
    """q [B,T,N,Hd], k and v [B,T,K,Hd], segment_ids [B,T] -> [B,T,N,Hd] by the C++ kernel;
    raises KernelUnavailable (with the reason) where it cannot be built."""
    reason = _load()
    if reason is not None:
        raise KernelUnavailable(reason)
    return per_device_attention(
        lambda q, k, v, s: _attend_one_device(q, k, v, s, sliding_window), q, k, v, segment_ids)
