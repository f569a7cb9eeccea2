"""Self-attention on TPU through the Pallas splash kernel (jax.experimental.pallas.ops.tpu).

Why: XLA's attention materialises every [B, N, T, S] score in HBM; the splash kernel keeps
a block of scores in VMEM at a time and skips the blocks the mask empties (the causal upper
triangle, what lies before a sliding window), so attention memory stays linear in T. It
runs the same mask rule as models/attention.py:

    query i may attend key j  iff  segment(i) == segment(j)  and  j <= i
                                   and  i - j < window (when the model has one)

(the kernel's SegmentIds carry packing and padding; CausalMask / LocalMask the rest), with
grouped-query attention native (query head h reads kv head h // group), the scale
1/sqrt(head_dim) applied to q first, as the kernel expects.

Sharding: inside jit the kernel is a custom call, which XLA cannot partition, so it runs
per device under shard_map (`sharding.per_device_attention`: rows over the batch axes,
heads over `tensor` where it divides them; the sequence is never split).
It is a TPU kernel: `model.attention_impl=splash` on another platform is refused
(models/attention.resolve_attention_impl).

`interpret=True` runs the kernel in Pallas' interpreter on any backend: how the numerics are
tested on CPU (tests/test_splash_attention.py).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from derta_jax.models.sharding import per_device_attention

LANES = 128  # the kernel's blocks are multiples of the TPU's 128 lanes
BLOCK_CHOICES = (512, 256, 128)  # the largest that divides T (512: MaxText's default)


def supports(seq_len: int) -> bool:
    """Whether the kernel takes sequences of `seq_len` tokens (a multiple of 128)."""
    return seq_len % LANES == 0


def block_size(seq_len: int) -> int:
    """The kernel's query and key block: the largest of BLOCK_CHOICES dividing `seq_len`."""
    for block in BLOCK_CHOICES:
        if seq_len % block == 0:
            return block
    raise ValueError(f"splash attention needs a sequence length that is a multiple of {LANES}, "
                     f"got {seq_len}")


def _kernel(num_heads: int, seq_len: int, sliding_window: Optional[int], interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    shape = (seq_len, seq_len)
    mask = (sm.CausalMask(shape) if sliding_window is None
            else sm.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0))
    block = block_size(seq_len)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha(sm.MultiHeadMask([mask] * num_heads), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, interpret=interpret)


def _attend(q, k, v, segment_ids, sliding_window: Optional[int], interpret: bool):
    """One device's rows and heads: q [B,T,N,Hd], k/v [B,T,K,Hd], segment_ids [B,T]."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import (
        SegmentIds)

    b, t, n, hd = q.shape
    kernel = _kernel(n, t, sliding_window, interpret)
    scaled = (q * jnp.asarray(1.0 / math.sqrt(hd), q.dtype)).astype(k.dtype)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B,T,H,Hd] -> [B,H,T,Hd]
    segments = segment_ids.astype(jnp.int32)
    out = jax.vmap(kernel)(heads_first(scaled), heads_first(k), heads_first(v),
                           SegmentIds(q=segments, kv=segments))
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     sliding_window: Optional[int], *, interpret: bool = False) -> jax.Array:
    """q [B,T,N,Hd], k and v [B,T,K,Hd], segment_ids [B,T] -> [B,T,N,Hd]: causal
    self-attention within segments (and the window), by the splash kernel; on a mesh, one
    kernel per device over its rows and heads (module docstring)."""
    return per_device_attention(
        lambda q, k, v, s: _attend(q, k, v, s, sliding_window, interpret), q, k, v, segment_ids)
