"""Logical-axis rules: how a named array dimension maps onto a device mesh.

Parameters (and the KV cache) carry logical axis names (embed, vocab, heads, ...); a short
rule table maps each name to mesh axes (data, fsdp, tensor, expert). The same code then
runs on 1 CPU, 8 fake CPU devices, a GPU node or a TPU pod: only the mesh shape changes.
It lives with the models because the names are the models' contract; training, the
planner, convert, weights loading and decoding all lay arrays out through it.

Default rules are FSDP + optional tensor parallelism:
  - the embed dimension of every weight is sharded over `fsdp` (ZeRO-3 style),
  - heads / kv_heads / mlp / vocab over `tensor`,
  - experts over `expert`,
  - the batch over (data, fsdp).
A dimension whose size the mesh axes do not divide is replicated instead, so small test
models still run on 8 devices.

LoRA adapters (nnx.LoRAParam) have a small unnamed rank axis, so the rules often leave an
adapter replicated over `fsdp` (B of q_proj, A of down_proj: most adapter bytes under pure
FSDP). For them a fallback shards the largest dimension that `fsdp` divides, never the
scanned `layers` axis (`fsdp_fallback`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# logical axis name -> mesh axes (a tuple: a dimension may be split over several axes).
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "experts": ("expert",),
    "head_dim": (),
    "layers": (),
    "length": (),
}

BATCH_AXES = ("data", "fsdp")


def _mesh_axes_for(dim: int, logical: Optional[str], mesh: Mesh,
                   rules: Mapping[str, Sequence[str]], used: set) -> Any:
    if logical is None:
        return None
    if logical not in rules:
        raise KeyError(f"logical axis {logical!r} has no sharding rule; known: {sorted(rules)}")
    axes = tuple(a for a in rules[logical] if a not in used and mesh.shape[a] > 1)
    if not axes:
        return None
    if dim % math.prod(mesh.shape[a] for a in axes) != 0:
        return None  # uneven split: replicate this dimension
    used.update(axes)
    return axes[0] if len(axes) == 1 else axes


def logical_to_spec(shape: Sequence[int], logical_axes: Optional[Sequence[Optional[str]]],
                    mesh: Mesh, rules: Mapping[str, Sequence[str]] = DEFAULT_RULES) -> P:
    """PartitionSpec for one array from its logical axis names (None = replicated)."""
    if not logical_axes:
        return P()
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set = set()
    return P(*(_mesh_axes_for(d, name, mesh, rules, used) for d, name in zip(shape, logical_axes)))


def _uses(entry: Any, axis: str) -> bool:
    return entry == axis or (isinstance(entry, tuple) and axis in entry)


def fsdp_fallback(shape: Sequence[int], spec: P, mesh: Mesh,
                  logical_axes: Optional[Sequence[Optional[str]]] = None) -> P:
    """`spec`, or when it leaves the array replicated over `fsdp`, `spec` with `fsdp` on the
    largest still unsharded dimension that it divides (not `layers`: scan slices that one)."""
    size = mesh.shape.get("fsdp", 1)
    entries = list(spec) + [None] * (len(shape) - len(spec))
    if size <= 1 or any(_uses(e, "fsdp") for e in entries):
        return spec
    names = list(logical_axes) if logical_axes else [None] * len(shape)
    free = [i for i, dim in enumerate(shape)
            if entries[i] is None and dim % size == 0 and names[i] != "layers"]
    if not free:
        return spec
    entries[max(free, key=lambda i: (shape[i], -i))] = "fsdp"  # largest; first on a tie
    return P(*entries)


def _logical_names(variable: Any) -> Optional[tuple]:
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names is not None:
            return tuple(names)
    return None


def state_shardings(abstract_state: Any, mesh: Mesh,
                    rules: Mapping[str, Sequence[str]] = DEFAULT_RULES) -> Any:
    """NamedShardings for an nnx.State (of Variables) from their logical-axis metadata
    (LoRA adapters with the `fsdp_fallback`)."""
    from flax import nnx

    def one(variable):
        value = variable.get_value() if hasattr(variable, "get_value") else variable.value
        names = _logical_names(variable)
        spec = logical_to_spec(value.shape, names, mesh, rules)
        if isinstance(variable, nnx.LoRAParam):
            spec = fsdp_fallback(value.shape, spec, mesh, names)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays [B, T, ...]: the batch dimension over (data, fsdp), the rest replicated."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    lead = axes if len(axes) > 1 else (axes[0] if axes else None)
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
    """How many ways `batch_sharding` splits the rows: a batch is padded to a multiple."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_global(host: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """An array every process holds in full (the same value everywhere, e.g. a batch all
    processes built from the same prompts) -> one jax.Array on `sharding`. Each process
    places only its own devices' shards: no collective, safe on a multi-host slice (a plain
    device_put would compare the value across processes first)."""
    import numpy as np

    value = np.asarray(host)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def fetch_global(array: jax.Array) -> Any:
    """The whole value of `array` as numpy, on every process (gathered from the other
    processes when it spans several)."""
    import numpy as np

    if array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def kv_cache_shardings(model_config: Any, mesh: Mesh, batch_size: int, max_len: int,
                       rules: Mapping[str, Sequence[str]] = DEFAULT_RULES) -> Any:
    """A KVCache of NamedShardings: rows over the batch axes (data, fsdp), kv heads over
    `tensor`, by the same rules as the weights (a size the axes do not divide stays whole)."""
    from derta_jax.models.attention import KV_CACHE_AXES, KVCache, kv_cache_shape

    kv_shape = kv_cache_shape(model_config, batch_size, max_len)
    kv = NamedSharding(mesh, logical_to_spec(kv_shape, KV_CACHE_AXES, mesh, rules))
    segments = NamedSharding(mesh, logical_to_spec((batch_size, max_len), ("batch", "length"),
                                                   mesh, rules))
    return KVCache(k=kv, v=kv, segment_ids=segments, index=replicated(mesh))


def kernel_row_axes(rows: int, axes: list, mesh) -> tuple:
    """The batch axes to split `rows` over for a per-device kernel: all of them when their
    product divides `rows`, else the larger single axis that does (else none: every device
    attends every row)."""
    if axes and rows % math.prod(mesh.shape[a] for a in axes) == 0:
        return tuple(axes)
    fitting = [a for a in axes if rows % mesh.shape[a] == 0]
    return (max(fitting, key=lambda a: mesh.shape[a]),) if fitting else ()


def per_device_attention(attend, q: jax.Array, k: jax.Array, v: jax.Array,
                         segment_ids: jax.Array) -> jax.Array:
    """attend(q, k, v, segment_ids) -> [B,T,N,Hd], run once per device of the mesh being
    traced for. Why: an attention kernel is a custom call, which XLA cannot partition, so
    it runs under jax.shard_map: rows over the batch axes (those whose sizes divide the
    rows), heads over `tensor` when it divides both the query and the kv heads (else
    whole). The sequence is never split. Without a mesh, attend runs as it is."""
    b, _, n, _ = q.shape
    kv_heads = k.shape[2]
    mesh = jax.sharding.get_abstract_mesh()
    free = [] if mesh.empty else [a for a in mesh.axis_names if a not in mesh.manual_axes]
    if not free:
        return attend(q, k, v, segment_ids)
    rows = kernel_row_axes(b, [a for a in BATCH_AXES if a in free and mesh.shape[a] > 1], mesh)
    tensor = mesh.shape.get("tensor", 1) if "tensor" in free else 1
    heads = "tensor" if tensor > 1 and n % tensor == 0 and kv_heads % tensor == 0 else None
    lead = rows if len(rows) > 1 else (rows[0] if rows else None)
    qkv = P(lead, None, heads, None)
    segments = P(lead, None)
    if AxisType.Explicit in mesh.axis_types:  # shard_map wants inputs laid out already
        q, k, v = (jax.sharding.reshard(x, qkv) for x in (q, k, v))
        segment_ids = jax.sharding.reshard(segment_ids, segments)
    per_device = jax.shard_map(attend, in_specs=(qkv, qkv, qkv, segments), out_specs=qkv,
                               axis_names=frozenset(free), check_vma=False)
    return per_device(q, k, v, segment_ids)
