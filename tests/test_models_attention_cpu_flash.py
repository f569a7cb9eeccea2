"""attention_impl="cpu_flash", the C++ CPU kernel, computes the "xla" path's attention.

Against the whole-matrix path (jax.nn.dot_product_attention with the full mask): values and
gradients with packed segments, padding, a segment id that comes back later in the row, a
sliding window, lengths and head dims that are not multiples of the kernel's blocks or
vector width, GQA, bfloat16 inputs; a mesh of 8 fake devices (a whole model's logits:
tests/test_models_attention_chunked.py; the kernel found in a compiled step:
tests/test_device_check.py). And
the build: "auto" picks the kernel on CPU, and where it cannot be built (a compiler that
fails) "auto" keeps the chunked path while an explicit cpu_flash names the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from derta_jax.models import cpu_flash
from derta_jax.models.attention import (_dot_product_attention, attention_mask,
                                        resolve_attention_impl)
from tests.test_models_attention_chunked import _segments as packed_segments
from tests.xla_env import xla_flags


def _segments(batch: int, length: int, seed: int) -> np.ndarray:
    """The chunked test's packed rows (padding at the end of odd rows), and row 2 reusing
    segment 1 after its last cut (the mask rule is equality of ids, not contiguity)."""
    out = packed_segments(batch, length, seed)
    if batch > 2:
        last_cut = int(np.flatnonzero(np.diff(out[2]))[-1]) + 1
        out[2, last_cut:] = 1
    return out


def _whole(segments, window):
    index = jnp.arange(segments.shape[1], dtype=jnp.int32)

    def attend(q, k, v):
        mask = attention_mask(segments, segments, index, index, window)
        return _dot_product_attention(q, k, v, mask, "xla", window)
    return attend


def _kernel(segments, window):
    return lambda q, k, v: cpu_flash.cpu_flash_attention(q, k, v, segments, window)


def _values_and_grads(attend, q, k, v, weights):
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * weights)  # noqa: E731
    return jax.jit(attend)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def test_the_kernel_builds_here():
    assert cpu_flash.available(), cpu_flash.why_unavailable()


@pytest.mark.parametrize("length, heads, kv_heads, head_dim, window", [
    (37, 6, 2, 16, None),    # shorter than one block, not a multiple of the vector width
    (100, 4, 4, 12, 9),      # head dim padded inside the kernel; sliding window; MHA
    (130, 8, 2, 32, None),   # several query blocks, GQA of 4
])
def test_cpu_flash_equals_the_whole_matrix_with_gradients(length, heads, kv_heads, head_dim,
                                                          window):
    rng = np.random.default_rng(length)
    q, k, v = (jnp.asarray(rng.standard_normal((4, length, h, head_dim)), jnp.float32)
               for h in (heads, kv_heads, kv_heads))
    weights = jnp.asarray(rng.standard_normal((4, length, heads, head_dim)), jnp.float32)
    segments = jnp.asarray(_segments(4, length, length))
    out, grads = _values_and_grads(_kernel(segments, window), q, k, v, weights)
    ref_out, ref_grads = _values_and_grads(_whole(segments, window), q, k, v, weights)
    np.testing.assert_allclose(out, ref_out, atol=2e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=2e-5)
    assert float(jnp.abs(ref_grads[1]).max()) > 0.1  # gradients that could fail


def test_bfloat16_inputs_come_back_in_bfloat16_with_the_float32_answer():
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 50, h, 16)), jnp.bfloat16) for h in (4, 2, 2))
    segments = jnp.asarray(_segments(2, 50, 1))
    out = jax.jit(_kernel(segments, None))(q, k, v)
    assert out.dtype == jnp.bfloat16
    as_f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = jax.jit(_whole(segments, None))(*as_f32)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=1e-2)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_under_a_mesh_each_device_runs_its_rows_and_heads(axis_type):
    from jax.sharding import AxisType

    assert len(jax.devices()) >= 8  # tests/conftest.py's XLA_FLAGS
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((4, 70, h, 16)), jnp.float32) for h in (4, 2, 2))
    weights = jnp.asarray(rng.standard_normal((4, 70, 4, 16)), jnp.float32)
    segments = jnp.asarray(_segments(4, 70, 5))
    mesh = jax.make_mesh((2, 2, 2, 1), ("data", "fsdp", "tensor", "expert"),
                         devices=jax.devices()[:8], axis_types=(getattr(AxisType, axis_type),) * 4)
    with jax.set_mesh(mesh):
        out, grads = _values_and_grads(_kernel(segments, None), q, k, v, weights)
        lowered = jax.jit(_kernel(segments, None)).lower(q, k, v).as_text()
    ref_out, ref_grads = _values_and_grads(_whole(segments, None), q, k, v, weights)
    assert "shard_map" in lowered or "sdy.manual_computation" in lowered
    np.testing.assert_allclose(out, ref_out, atol=2e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_auto_on_cpu_is_the_kernel():
    assert resolve_attention_impl("auto", "cpu") == "cpu_flash"
    assert resolve_attention_impl("cpu_flash", "cpu") == "cpu_flash"
    with pytest.raises(ValueError, match="attention_impl=cpu_flash.*CPU only.*tpu"):
        resolve_attention_impl("cpu_flash", "tpu")


PROBE = """
import json
from derta_jax.models import attention, cpu_flash
try:
    attention.resolve_attention_impl("cpu_flash", "cpu")
    explicit = None
except ValueError as error:
    explicit = str(error)
print(json.dumps({"auto": attention.resolve_attention_impl("auto", "cpu"),
                  "explicit": explicit, "cache": sorted(p.name for p in
                  cpu_flash.cache_dir().glob("*.so"))}))
"""


def _probe(tmp_path, **env) -> dict:
    run_env = dict(os.environ, DERTA_JAX_CACHE=str(tmp_path), XLA_FLAGS=xla_flags(1), **env)
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=run_env, cwd=os.path.dirname(os.path.dirname(__file__)), check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_without_a_working_compiler_auto_keeps_chunked_and_cpu_flash_says_why(tmp_path):
    broken = _probe(tmp_path / "broken", CXX="false")
    assert broken["auto"] == "chunked"
    assert "cannot be built" in broken["explicit"] and "false" in broken["explicit"]
    assert broken["cache"] == []
    built = _probe(tmp_path / "built")  # the machine's compiler: built once into the cache
    assert built["auto"] == "cpu_flash" and built["explicit"] is None
    assert len(built["cache"]) == 1
    so = tmp_path / "built" / "kernels" / built["cache"][0]
    before = so.stat().st_mtime_ns
    assert _probe(tmp_path / "built")["cache"] == built["cache"]
    assert so.stat().st_mtime_ns == before  # reused, not rebuilt
