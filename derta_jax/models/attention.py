"""Grouped-query self-attention with rotary embeddings, packing masks and a KV cache.

Why one module: training (packed or padded rows), prefill and one-token decode all run
the same projections and the same mask rule, so they cannot drift apart:

    query i may attend key j  iff  segment(i) == segment(j)          (packing, padding)
                                   and index(j) <= index(i)          (causal)
                                   and index(i) - index(j) < window  (Mistral; optional)

Indices are slots in the sequence (or in the KV cache), as in Hugging Face; inside a
packed row they differ from RoPE positions only by a constant, so windows agree.
Padding has segment 0 and therefore attends only to padding, so no softmax row is ever
empty (no NaN on any backend) and real tokens never see padding.

Without a cache, attention is `self_attention`: `jax.nn.dot_product_attention`
(implementation "xla" or "cudnn"; "cudnn" serves training on GPU, checked against "xla" on
an H200 by benchmarks/device_check.py, never run in the CPU CI; "chunked" runs it a block
of queries at a time against only the keys they can see, which skips the masked
triangle), which performs GQA natively (query head h uses kv head h // group, the same
grouping as Hugging Face's repeat_kv); or "cpu_flash", the fused C++ kernel of
models/cpu_flash.py (CPU, built on first use); or, "splash", the Pallas TPU kernel of
models/splash.py (sequences of a multiple of 128 tokens; others take the "xla" path).
With a cache (prefill and decoding), `cached_attention` does the same arithmetic on the
cache's own layout. The default, "auto", is chosen per platform in ONE place,
`resolve_attention_impl`.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

import jax
import numpy as np
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from derta_jax.models import cpu_flash, splash
from derta_jax.models.config import ModelConfig
from derta_jax.models.layers import Projection, apply_rope, rope_inverse_frequencies


class KVCache(NamedTuple):
    """Keys and values of every layer for a batch of rows, plus the slots' segment ids.

    k, v: [layers, batch, kv_heads, max_len, head_dim] (`kv_cache_shape`); segment_ids:
    [batch, max_len] (0 = empty or padding slot); index: int32 scalar, the next slot to
    write (all rows share it: left padding aligns the rows' ends).

    The layout is the one attention reads: per (row, kv head) a contiguous [slots,
    head_dim] matrix, so neither dot transposes the cache, and each layer writes its new
    slots into the whole cache in place (measured: a [layers, batch, slots, heads, dim]
    cache sliced and re-stacked per layer copied it about six times per token).
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array


KV_CACHE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")  # logical names


def kv_cache_shape(config: ModelConfig, batch_size: int, max_len: int) -> tuple[int, ...]:
    """The shape of KVCache.k and .v (axes KV_CACHE_AXES)."""
    return (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)


def init_kv_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    dtype = jnp.dtype(dtype or config.dtype)
    shape = kv_cache_shape(config, batch_size, max_len)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segment_ids=jnp.zeros((batch_size, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32))


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_index: jax.Array,
                   kv_index: jax.Array, sliding_window: Optional[int]) -> jax.Array:
    """Boolean mask [B, 1, T, S] from segments [B,T]/[B,S] and slot indices [T]/[S]."""
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    distance = q_index[:, None] - kv_index[None, :]
    allowed = distance >= 0
    if sliding_window is not None:
        allowed = allowed & (distance < sliding_window)
    return (same_segment & allowed[None])[:, None]


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, h, k, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        self.q_proj = Projection("btd,dhk->bthk", (d, h, hd), ("embed", "heads", "head_dim"), **kw)
        self.k_proj = Projection("btd,dhk->bthk", (d, k, hd), ("embed", "kv_heads", "head_dim"), **kw)
        self.v_proj = Projection("btd,dhk->bthk", (d, k, hd), ("embed", "kv_heads", "head_dim"), **kw)
        self.o_proj = Projection("bthk,hkd->btd", (h, hd, d), ("heads", "head_dim", "embed"), **kw)
        self.sliding_window = config.sliding_window
        self.implementation = config.attention_impl
        # A tuple of floats: static, hashable graph data (not a parameter).
        self.inv_freq = tuple(float(f) for f in
                              rope_inverse_frequencies(hd, config.rope_theta, config.rope_scaling))

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cache: Optional[tuple[jax.Array, jax.Array]] = None,
                 cache_segment_ids: Optional[jax.Array] = None,
                 cache_index: Optional[jax.Array] = None, layer: Optional[jax.Array] = None):
        """x [B,T,D] -> (y [B,T,D], updated (k, v) cache or None).

        Without a cache, the T tokens attend among themselves. With one (every layer's
        keys and values, KVCache.k / .v), their keys and values are written at slots
        cache_index .. cache_index+T-1 of layer `layer` and they attend to every slot; the
        caller passes `cache_segment_ids` [B, S] already updated for the new tokens.
        """
        q = apply_rope(self.q_proj(x), positions, self.inv_freq)
        k = apply_rope(self.k_proj(x), positions, self.inv_freq)
        v = self.v_proj(x)
        t = x.shape[1]
        if cache is None:
            out = self_attention(q, k, v, segment_ids, self.sliding_window, self.implementation)
            new_cache = None
        else:
            k_all, v_all = (_write_slots(whole, new, layer, cache_index)
                            for whole, new in zip(cache, (k, v)))
            keys, values = (jax.lax.dynamic_index_in_dim(whole, layer, keepdims=False)
                            for whole in (k_all, v_all))
            mask = attention_mask(segment_ids, cache_segment_ids,
                                  cache_index + jnp.arange(t, dtype=jnp.int32),
                                  jnp.arange(keys.shape[2], dtype=jnp.int32), self.sliding_window)
            out = cached_attention(q, keys, values, mask)
            new_cache = (k_all, v_all)
        out = checkpoint_name(out, "attn_out")
        return self.o_proj(out), new_cache


def _write_slots(whole: jax.Array, new: jax.Array, layer, index) -> jax.Array:
    """new [B, T, K, Hd] into whole [L, B, K, S, Hd] at (layer, slots index..index+T-1)."""
    new = jnp.swapaxes(new, 1, 2)[None].astype(whole.dtype)
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(whole, new, (jnp.asarray(layer, jnp.int32), zero, zero,
                                                     index, zero))


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array,
                     mask: jax.Array) -> jax.Array:
    """Attention of q [B,T,N,Hd] over a cache layer (keys, values [B,K,S,Hd]) under mask
    [B,1,T,S] -> [B,T,N,Hd]. The arithmetic of jax.nn.dot_product_attention's "xla" path
    (float32 logits, scale 1/sqrt(Hd), masked logits at the same large negative, float32
    softmax cast back to the keys' dtype), with GQA as grouped einsums: query head h
    reads kv head h // group."""
    b, t, n, hd = q.shape
    kv_heads = keys.shape[1]
    q = q.reshape(b, t, kv_heads, n // kv_heads, hd)
    keys, values = keys.astype(q.dtype), values.astype(q.dtype)
    logits = jnp.einsum("btkgd,bksd->bkgts", q, keys, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(1.0 / np.sqrt(hd))
    logits = jnp.where(mask[:, :, None], logits, jnp.float32(-0.7 * np.finfo(np.float32).max))
    probs = jax.nn.softmax(logits, axis=-1).astype(keys.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, values)
    return out.reshape(b, t, n, hd)


CHUNK = 128  # queries per block of chunked_attention (64-128 measured fastest on CPU at T=1024)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                      sliding_window: Optional[int], chunk: int = CHUNK) -> jax.Array:
    """Self-attention a block of `chunk` queries at a time, each against only the keys it
    can see: [window start, block end). The same mask rule and arithmetic as the "xla"
    path (jax.nn.dot_product_attention per block), but the masked upper triangle (and what
    lies before a sliding window) is never computed, and each block's scores stay small.
    On CPU, where XLA materialises all [B,N,T,S] scores, one T=1024 layer took 102 ms this
    way against 183 ms (gradient 192 vs 452 ms; benchmarks/attention_cpu.py). Every query
    sees at least its own key, so no softmax row is empty."""
    t = q.shape[1]
    index = jnp.arange(t, dtype=jnp.int32)
    outs = []
    for lo in range(0, t, chunk):
        hi = min(lo + chunk, t)
        klo = 0 if sliding_window is None else max(0, lo - sliding_window + 1)
        mask = attention_mask(segment_ids[:, lo:hi], segment_ids[:, klo:hi], index[lo:hi],
                              index[klo:hi], sliding_window)
        outs.append(jax.nn.dot_product_attention(q[:, lo:hi], k[:, klo:hi], v[:, klo:hi],
                                                 mask=mask, implementation="xla"))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                   sliding_window: Optional[int], setting: str = "auto") -> jax.Array:
    """Attention of q [B,T,N,Hd] over k, v [B,T,K,Hd] of the same tokens under the module's
    mask rule, by model.attention_impl=`setting` (resolved here for these shapes)."""
    t = q.shape[1]
    implementation = resolve_attention_impl(setting, dtype=q.dtype, head_dim=q.shape[-1],
                                            seq_len=t)
    if implementation == "splash" and not splash.supports(t):
        implementation = "xla"
    if implementation == "splash":
        return splash.splash_attention(q, k, v, segment_ids, sliding_window)
    if implementation == "chunked":
        return chunked_attention(q, k, v, segment_ids, sliding_window)
    if implementation == "cpu_flash":
        return cpu_flash.cpu_flash_attention(q, k, v, segment_ids, sliding_window)
    index = jnp.arange(t, dtype=jnp.int32)
    mask = attention_mask(segment_ids, segment_ids, index, index, sliding_window)
    return _dot_product_attention(q, k, v, mask, implementation, sliding_window)


# auto sends cuDNN only lengths of the kind timed on an H200 (1024, 2048); cuDNN also took
# 200-token rows there with XLA's numerics (device_check attention_parity), but a length it
# refuses would stop a run at compile time, so the rule stays on the measured side
CUDNN_SEQ_MULTIPLE = 64


def cudnn_takes(dtype, head_dim: int, seq_len: int) -> bool:
    """Whether auto sends these shapes to cuDNN's fused kernel: half-precision compute (the
    kernel has no float32 path), head dims its flash kernel supports, and sequence lengths
    of the kind measured (BENCHMARKS.md, device check); anything else takes XLA."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim % 8 == 0 and head_dim <= 128 and seq_len % CUDNN_SEQ_MULTIPLE == 0)


def resolve_attention_impl(setting: str, platform: Optional[str] = None, *, dtype=None,
                           head_dim: Optional[int] = None,
                           seq_len: Optional[int] = None) -> Optional[str]:
    """The implementation that model.attention_impl=`setting` runs, for `platform` (default:
    the platform of the mesh being traced for, so that the planner's TPU compile on a CPU
    host gets the TPU choice; without a mesh, JAX's default backend). "auto":
      cpu: "cpu_flash" where the C++ kernel builds (a compiler is present), else
           "chunked". Measured (BENCHMARKS.md): one attention layer's forward and
           backward at 8 x 256, 45 -> 12 ms against "chunked", which itself took a
           2 x 1024 training step from 0.43x to 0.67x PyTorch's over "xla".
      gpu: "cudnn" where `cudnn_takes` the shapes (dtype, head_dim and seq_len given), else
           "xla". Measured on an H200 (BENCHMARKS.md): a Llama-3.2-1B step at 4 x 2048
           388 -> 167 ms, 100 -> 25 GiB of temporaries; JAX's own choice
           (implementation=None) compiled to XLA's attention there.
      tpu: "splash", the Pallas kernel (models/splash.py): memory linear in T, masked
           blocks skipped; sequences that are not a multiple of 128 take "xla".
      others: "xla".
    Any other setting is returned as it is; "splash" off TPU is a ValueError (the Pallas
    kernel is TPU code), and so is "cpu_flash" off CPU or where its kernel cannot be
    built (the reason is named)."""
    if setting not in ("auto", "splash", "cpu_flash"):
        return setting
    if platform is None:
        mesh = jax.sharding.get_abstract_mesh()
        platform = (mesh.abstract_device.platform if not mesh.empty and mesh.abstract_device
                    else jax.default_backend())
    if setting == "splash":
        if platform != "tpu":
            raise ValueError(f"model.attention_impl=splash: the Pallas splash kernel runs on "
                             f"TPU only; this step is traced for {platform} (use auto)")
        return setting
    if setting == "cpu_flash":
        if platform != "cpu":
            raise ValueError(f"model.attention_impl=cpu_flash: the C++ kernel runs on CPU "
                             f"only; this step is traced for {platform} (use auto)")
        if not cpu_flash.available():
            raise ValueError(f"model.attention_impl=cpu_flash: the kernel cannot be built "
                             f"here ({cpu_flash.why_unavailable()}); use auto or chunked")
        return setting
    if platform in ("gpu", "cuda"):
        shapes_known = None not in (dtype, head_dim, seq_len)
        return "cudnn" if shapes_known and cudnn_takes(dtype, head_dim, seq_len) else "xla"
    if platform == "cpu":
        return "cpu_flash" if cpu_flash.available() else "chunked"
    return {"tpu": "splash"}.get(platform, "xla")


def _dot_product_attention(q, k, v, mask, implementation: Optional[str],
                           sliding_window: Optional[int]):
    """jax.nn.dot_product_attention with our full mask; for cuDNN, the causal structure and
    window are also stated explicitly so the fused kernel can skip masked blocks (the
    mask still carries segments and padding). The cached path uses `cached_attention`:
    its queries sit at the end of the keys, which cuDNN's causal mask does not model."""
    if implementation == "cudnn":
        window = None if sliding_window is None else (sliding_window - 1, 0)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                            local_window_size=window, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def attention_in_hlo(hlo_text: str) -> tuple[str, list]:
    """What a compiled program's attention runs on, from its HLO text -> (name, evidence):
    "cudnn" (a cuDNN fused-attention custom call), "cpu_flash" (models/cpu_flash.py's C++
    kernel), "pallas" (a Mosaic/Triton kernel, e.g. splash), else "xla" (plain HLO dots and
    softmax). The planner and the device check say what was compiled, not what was
    configured."""
    targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo_text)))
    cudnn = [t for t in targets if "cudnn$fmha" in t]
    if cudnn:
        return "cudnn", cudnn
    fused_cpu = [t for t in targets if t.startswith("derta_cpu_flash")]
    if fused_cpu:
        return "cpu_flash", fused_cpu
    pallas = [t for t in targets if t.startswith(("tpu_custom_call", "mosaic_gpu",
                                                   "triton_kernel_call", "__gpu$xla.gpu.triton"))]
    if pallas:
        return "pallas", pallas
    return "xla", targets
