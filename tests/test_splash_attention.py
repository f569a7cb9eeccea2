"""The TPU splash-attention path (models/splash.py) against the XLA path, run by Pallas'
interpreter on CPU: values and gradients with packed and padded rows, grouped-query heads,
a sliding window, and under a mesh (one kernel per device over its rows and heads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from derta_jax.models import sharding, splash
from derta_jax.models.attention import _dot_product_attention, attention_mask

B, T, N, K, HD = 2, 256, 4, 2, 32


def _inputs(seed=0, rows=B):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((rows, T, heads, HD), np.float32) for heads in (N, K, K))
    segments = np.ones((rows, T), np.int32)
    segments[0, 100:] = 2  # two packed rows
    segments[0, 230:] = 0  # padding after them
    segments[1, 200:] = 0
    weights = rng.standard_normal((rows, T, N, HD), np.float32)
    return [jnp.asarray(x) for x in (q, k, v, segments, weights)]


def _xla(q, k, v, segments, window):
    index = jnp.arange(T, dtype=jnp.int32)
    mask = attention_mask(segments, segments, index, index, window)
    return _dot_product_attention(q, k, v, mask, "xla", window)


def _splash(q, k, v, segments, window):
    return splash.splash_attention(q, k, v, segments, window, interpret=True)


def _value_and_grads(attention, q, k, v, segments, weights, window):
    loss = lambda q, k, v: jnp.sum(attention(q, k, v, segments, window) * weights)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v), \
        jax.jit(attention, static_argnums=4)(q, k, v, segments, window)


@pytest.mark.parametrize("window", [None, 48])
def test_splash_equals_the_xla_path_in_values_and_gradients(window):
    q, k, v, segments, weights = _inputs()
    (loss, grads), out = _value_and_grads(_splash, q, k, v, segments, weights, window)
    (ref_loss, ref_grads), ref_out = _value_and_grads(_xla, q, k, v, segments, weights, window)
    np.testing.assert_allclose(out, ref_out, atol=2e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref, atol=5e-5)
    assert float(jnp.abs(ref_grads[1]).max()) > 0.1  # gradients that could fail


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])  # the trainer's mesh is Auto
def test_splash_under_a_mesh_splits_rows_and_heads(axis_type):
    """8 fake devices as data 2 x fsdp 2 x tensor 2: each device's kernel sees its own one
    of the 4 rows and its half of the heads, and the result is the XLA path's."""
    from jax.sharding import AxisType

    assert len(jax.devices()) >= 8  # tests/conftest.py's XLA_FLAGS
    q, k, v, segments, weights = _inputs(1, rows=4)
    mesh = jax.make_mesh((2, 2, 2, 1), ("data", "fsdp", "tensor", "expert"),
                         devices=jax.devices()[:8], axis_types=(getattr(AxisType, axis_type),) * 4)
    with jax.set_mesh(mesh):
        (loss, grads), out = _value_and_grads(_splash, q, k, v, segments, weights, None)
        lowered = jax.jit(_splash, static_argnums=4).lower(q, k, v, segments, None).as_text()
    (ref_loss, ref_grads), ref_out = _value_and_grads(_xla, q, k, v, segments, weights, None)
    assert "shard_map" in lowered or "sdy.manual_computation" in lowered
    np.testing.assert_allclose(out, ref_out, atol=2e-5)
    for grad, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref, atol=5e-5)


def test_rows_go_to_the_batch_axes_that_divide_them():
    class Mesh:
        shape = {"data": 2, "fsdp": 4}

    assert sharding.kernel_row_axes(8, ["data", "fsdp"], Mesh) == ("data", "fsdp")
    assert sharding.kernel_row_axes(4, ["data", "fsdp"], Mesh) == ("fsdp",)  # the larger
    assert sharding.kernel_row_axes(2, ["data", "fsdp"], Mesh) == ("data",)
    assert sharding.kernel_row_axes(3, ["data", "fsdp"], Mesh) == ()


def test_splash_off_tpu_is_refused_naming_the_setting():
    from derta_jax.models.attention import resolve_attention_impl

    assert resolve_attention_impl("splash", "tpu") == "splash"
    for platform in ("cpu", "gpu"):
        with pytest.raises(ValueError, match="model.attention_impl=splash: the Pallas splash "
                                             f"kernel runs on TPU only; this step is traced "
                                             f"for {platform}"):
            resolve_attention_impl("splash", platform)


def test_block_sizes_and_what_the_kernel_takes():
    assert [splash.block_size(t) for t in (128, 256, 384, 1024, 8192)] == [128, 256, 128, 512,
                                                                          512]
    assert splash.supports(2048) and not splash.supports(96)
    with pytest.raises(ValueError, match="multiple of 128, got 96"):
        splash.block_size(96)


def test_the_model_takes_the_splash_path_only_where_the_kernel_fits(monkeypatch):
    """model.attention_impl=splash: a model whose sequence is a multiple of 128 calls the
    kernel, another falls back to the XLA path; both give the XLA model's logits."""
    from flax import nnx

    from derta_jax.models.config import ModelConfig
    from derta_jax.models.transformer import Transformer

    from derta_jax.models import attention as attention_lib

    calls = []
    real = splash.splash_attention
    monkeypatch.setattr(attention_lib, "resolve_attention_impl",
                        lambda setting, platform=None, **shapes: setting)  # as if traced for TPU
    monkeypatch.setattr(splash, "splash_attention", lambda *a, **kw: calls.append(a[0].shape)
                        or real(*a, **kw, interpret=True))
    config = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)
    logits = {}
    for impl in ("xla", "splash"):
        model = Transformer(config.replace(attention_impl=impl), rngs=nnx.Rngs(0))
        for t in (128, 96):
            ids = jnp.arange(2 * t, dtype=jnp.int32).reshape(2, t) % 64
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
            hidden, _ = model(ids, positions, jnp.ones((2, t), jnp.int32))
            logits[impl, t] = np.asarray(model.logits(hidden))
    assert calls == [(2, 128, 4, 8)]
    for t in (128, 96):
        np.testing.assert_allclose(logits["splash", t], logits["xla", t], atol=1e-5)
