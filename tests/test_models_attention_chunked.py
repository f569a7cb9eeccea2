"""attention_impl="chunked" computes the "xla" path's attention, block by block.

Against the whole-matrix path (jax.nn.dot_product_attention with the full mask): values and
gradients, with packed segments, padding, a sliding window, a length that is not a multiple
of the block, GQA; and a whole model's logits with either implementation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from derta_jax.models.attention import (_dot_product_attention, attention_mask,
                                        chunked_attention)
from derta_jax.models.config import ModelConfig
from derta_jax.models.transformer import Transformer


def _segments(batch: int, length: int, seed: int) -> np.ndarray:
    """Packed rows: a few segments 1, 2, ... then padding (0) at the end of some rows."""
    rng = np.random.default_rng(seed)
    out = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), 3, replace=False))
        out[b] = np.searchsorted(cuts, np.arange(length), side="right") + 1
        if b % 2:
            out[b, cuts[-1]:] = 0
    return out


@pytest.mark.parametrize("length, chunk, window", [(37, 8, None), (37, 8, 7), (16, 64, None)])
def test_chunked_equals_the_whole_matrix_with_gradients(length, chunk, window):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((3, length, heads, 16)), jnp.float32)
               for heads in (6, 2, 2))
    segments = jnp.asarray(_segments(3, length, 1))
    index = jnp.arange(length, dtype=jnp.int32)

    def whole(q, k, v):
        mask = attention_mask(segments, segments, index, index, window)
        return _dot_product_attention(q, k, v, mask, "xla", window)

    def blocks(q, k, v):
        return chunked_attention(q, k, v, segments, window, chunk=chunk)

    np.testing.assert_allclose(jax.jit(blocks)(q, k, v), jax.jit(whole)(q, k, v), atol=2e-6)
    weights = jnp.asarray(rng.standard_normal((3, length, 6, 16)), jnp.float32)
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2)))(
        q, k, v) for f in (whole, blocks)]
    for got, want in zip(grads[1], grads[0]):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_a_model_gives_the_same_logits_with_every_cpu_implementation():
    """xla, chunked and cpu_flash (the C++ kernel), a sliding window and packed rows."""
    config = ModelConfig(family="mistral", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                         sliding_window=9)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 300)), jnp.int32)
    segments = jnp.asarray(_segments(2, 300, 3))
    positions = jnp.broadcast_to(jnp.arange(300, dtype=jnp.int32), (2, 300))
    logits = []
    forward = nnx.jit(lambda m, i, p, s: m.logits(m(i, p, s)[0]))
    for impl in ("xla", "chunked", "cpu_flash"):
        model = Transformer(dataclasses.replace(config, attention_impl=impl), rngs=nnx.Rngs(0))
        logits.append(np.asarray(forward(model, ids, positions, segments)))
    for other in logits[1:]:
        np.testing.assert_allclose(other, logits[0], atol=1e-5)


def test_auto_attention_is_chosen_by_the_platform_traced_for():
    import jax

    from derta_jax.models.attention import resolve_attention_impl

    assert [resolve_attention_impl("auto", p) for p in ("cpu", "gpu", "tpu")] == [
        "cpu_flash", "xla", "splash"]  # cpu_flash: the C++ kernel builds here  # the GPU's choice needs the shapes
    bf16, f32 = jnp.bfloat16, jnp.float32
    gpu = lambda dtype, head_dim, seq: resolve_attention_impl(  # noqa: E731
        "auto", "gpu", dtype=dtype, head_dim=head_dim, seq_len=seq)
    assert gpu(bf16, 64, 2048) == gpu(jnp.float16, 128, 1024) == "cudnn"
    # no float32 kernel; head dims and lengths outside what was measured take XLA
    assert gpu(f32, 64, 2048) == gpu(bf16, 256, 2048) == gpu(bf16, 60, 2048) == "xla"
    assert gpu(bf16, 64, 2000) == "xla"
    assert resolve_attention_impl("auto", "cpu", dtype=bf16, head_dim=64, seq_len=2048) == (
        "cpu_flash")
    assert resolve_attention_impl("xla", "cpu") == "xla"
    assert resolve_attention_impl("cudnn", "tpu") == "cudnn"
    assert resolve_attention_impl("auto") == "cpu_flash"  # no mesh: this CPU backend
    seen = []
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        jax.jit(lambda x: seen.append(resolve_attention_impl("auto")) or x)(1.0)
    assert seen == ["cpu_flash"]
