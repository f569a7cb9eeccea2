"""attention_impl="cpu_flash", the C++ CPU kernel, computes the "xla" path's attention.

Against the whole-matrix path (jax.nn.dot_product_attention with the full mask): values and
gradients with packed segments, padding, a segment id that comes back later in the row, a
sliding window, lengths and head dims that are not multiples of the kernel's blocks or
vector width, GQA, bfloat16 inputs; a whole model's logits; a mesh of 8 fake devices. And
the build: "auto" picks the kernel on CPU, and where it cannot be built (a compiler that
fails) "auto" keeps the chunked path while an explicit cpu_flash names the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from derta_jax.models import cpu_flash
from derta_jax.models.attention import (_dot_product_attention, attention_in_hlo,
                                        attention_mask, resolve_attention_impl)
from derta_jax.models.config import ModelConfig
from derta_jax.models.transformer import Transformer
from tests.xla_env import xla_flags


def _segments(batch: int, length: int, seed: int) -> np.ndarray:
    """Packed rows, padding (0) at the end of odd rows; row 2 reuses segment 1 at its end
    (the mask rule is equality of ids, not contiguity)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), 3, replace=False))
        out[b] = np.searchsorted(cuts, np.arange(length), side="right") + 1
        if b % 2:
            out[b, cuts[-1]:] = 0
        if b == 2:
            out[b, cuts[-1]:] = 1
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


def test_a_model_gives_the_xla_logits_and_compiles_the_kernel():
    config = ModelConfig(family="mistral", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                         sliding_window=9)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 300)), jnp.int32)
    segments = jnp.asarray(_segments(2, 300, 3))
    positions = jnp.broadcast_to(jnp.arange(300, dtype=jnp.int32), (2, 300))
    logits, hlo = [], []
    for impl in ("xla", "auto"):
        model = Transformer(dataclasses.replace(config, attention_impl=impl), rngs=nnx.Rngs(0))
        graph, state = nnx.split(model)
        forward = jax.jit(lambda s, i, p, g: nnx.merge(graph, s).logits(
            nnx.merge(graph, s)(i, p, g)[0]))
        logits.append(np.asarray(forward(state, ids, positions, segments)))
        hlo.append(forward.lower(state, ids, positions, segments).compile().as_text())
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-5)
    assert attention_in_hlo(hlo[1])[0] == "cpu_flash"
    assert attention_in_hlo(hlo[0])[0] == "xla"


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
