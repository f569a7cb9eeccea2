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
under jax.shard_map over the mesh being traced for: rows over the batch axes (those whose
sizes divide the rows), heads over `tensor` when it divides both the query and the kv heads
(else whole), each device attending its own rows and heads. The sequence is never split.
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
from jax.sharding import AxisType, PartitionSpec

from derta_jax.models.sharding import BATCH_AXES

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


def _row_axes(rows: int, axes: list, mesh) -> tuple:
    """The batch axes to split `rows` over: all of them when their product divides `rows`,
    else the larger single axis that does (else none: every device attends every row)."""
    if axes and rows % math.prod(mesh.shape[a] for a in axes) == 0:
        return tuple(axes)
    fitting = [a for a in axes if rows % mesh.shape[a] == 0]
    return (max(fitting, key=lambda a: mesh.shape[a]),) if fitting else ()


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     sliding_window: Optional[int], *, interpret: bool = False) -> jax.Array:
    """q [B,T,N,Hd], k and v [B,T,K,Hd], segment_ids [B,T] -> [B,T,N,Hd]: causal
    self-attention within segments (and the window), by the splash kernel; on a mesh, one
    kernel per device over its rows and heads (module docstring)."""
    b, t, n, _ = q.shape
    kv_heads = k.shape[2]
    mesh = jax.sharding.get_abstract_mesh()
    free = [] if mesh.empty else [a for a in mesh.axis_names if a not in mesh.manual_axes]
    if not free:
        return _attend(q, k, v, segment_ids, sliding_window, interpret)
    rows = _row_axes(b, [a for a in BATCH_AXES if a in free and mesh.shape[a] > 1], mesh)
    tensor = mesh.shape.get("tensor", 1) if "tensor" in free else 1
    heads = "tensor" if tensor > 1 and n % tensor == 0 and kv_heads % tensor == 0 else None
    lead = rows if len(rows) > 1 else (rows[0] if rows else None)
    qkv = PartitionSpec(lead, None, heads, None)
    segments = PartitionSpec(lead, None)
    if AxisType.Explicit in mesh.axis_types:  # shard_map wants inputs laid out already
        q, k, v = (jax.sharding.reshard(x, qkv) for x in (q, k, v))
        segment_ids = jax.sharding.reshard(segment_ids, segments)
    attend = jax.shard_map(lambda q, k, v, s: _attend(q, k, v, s, sliding_window, interpret),
                           in_specs=(qkv, qkv, qkv, segments), out_specs=qkv,
                           axis_names=frozenset(free), check_vma=False)
    return attend(q, k, v, segment_ids)

