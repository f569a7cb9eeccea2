"""The planner's evaluation mode: weights + KV cache per device, and an ahead-of-time
compile of the two programs evaluation runs (derta_jax.models.decode.prefill and
decode_chunk) on the evaluation mesh.

Why: a model trained on a pod is evaluated on a pod; whether a batch of 64 prompts with
512 new tokens each fits next to the weights is a question for before the rental, like the
training step's. The figures come from the same sources as the training plan: the weights'
shardings are the trainer's rules (derta_jax.models.sharding.state_shardings), the KV cache's
are the decoder's own (kv_cache_shardings), and XLA's memory_analysis() of the compiled
programs counts what fusion and scheduling keep live. Nothing the size of the model is
allocated: every input is a jax.ShapeDtypeStruct.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
from flax import nnx

from derta_jax import weights
from derta_jax.models import decode
from derta_jax.models.attention import kv_cache_shape
from derta_jax.models.config import ModelConfig
from derta_jax.models import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """The evaluation batch: rows (padded to the batch shards) and cache length."""

    rows: int
    prompt_len: int
    max_new_tokens: int

    @property
    def cache_len(self) -> int:
        return self.prompt_len + self.max_new_tokens


def decode_shape(batch_size: int, prompt_len: int, max_new_tokens: int, mesh_sizes) -> DecodeShape:
    shards = math.prod(int(mesh_sizes[a]) for a in sharding_lib.BATCH_AXES)
    rows = -(-batch_size // shards) * shards  # generate pads the batch the same way
    return DecodeShape(rows, prompt_len, max_new_tokens)


def decode_memory(cfg: ModelConfig, mesh, shape: DecodeShape) -> dict:
    """Analytic bytes per device: the weights (the trainer's shardings) and the KV cache."""
    from derta_jax.train.plan_memory import params_per_device, per_device_bytes

    count, total, device = params_per_device(weights.abstract_params(cfg), mesh)
    cache = sharding_lib.kv_cache_shardings(cfg, mesh, shape.rows, shape.cache_len)
    kv_shape = kv_cache_shape(cfg, shape.rows, shape.cache_len)
    kv = 2 * per_device_bytes(kv_shape, cfg.dtype, cache.k)
    kv_total = 2 * math.prod(kv_shape) * jnp.dtype(cfg.dtype).itemsize
    return {"params": count, "weights_bytes": device, "weights_bytes_total": total,
            "kv_cache_bytes": kv, "kv_cache_bytes_total": kv_total}


def _abstract(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def abstract_decode_inputs(cfg: ModelConfig, mesh, shape: DecodeShape):
    """(graphdef, state, prefill inputs, decode carry, carry shardings) as ShapeDtypeStructs
    on `mesh`, laid out as generate lays out the real ones."""
    graphdef, state = nnx.split(weights.abstract_model(cfg))
    shardings = nnx.to_pure_dict(sharding_lib.state_shardings(state, mesh))
    nnx.replace_by_pure_dict(state, weights.with_shardings(nnx.to_pure_dict(state), shardings))
    shardings = decode.carry_shardings(cfg, mesh, shape.rows, shape.cache_len)
    cache_shardings = shardings.cache
    kv_shape = kv_cache_shape(cfg, shape.rows, shape.cache_len)
    cache = decode.KVCache(
        k=_abstract(kv_shape, jnp.dtype(cfg.dtype), cache_shardings.k),
        v=_abstract(kv_shape, jnp.dtype(cfg.dtype), cache_shardings.v),
        segment_ids=_abstract((shape.rows, shape.cache_len), jnp.int32, cache_shardings.segment_ids),
        index=_abstract((), jnp.int32, cache_shardings.index))
    rows2 = sharding_lib.batch_sharding(mesh)
    prompts = tuple(_abstract((shape.rows, shape.prompt_len), jnp.int32, rows2) for _ in range(3))
    key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
    carry = decode.DecodeCarry(
        cache=cache, logits=_abstract((shape.rows, cfg.vocab_size), jnp.float32, shardings.logits),
        positions=_abstract((shape.rows,), jnp.int32, shardings.positions),
        done=_abstract((shape.rows,), jnp.bool_, shardings.done),
        rng=_abstract((), key_dtype, shardings.rng))
    return graphdef, state, prompts, carry, shardings


def _memory(compiled, seconds: float) -> dict:
    stats = compiled.memory_analysis()
    out = {"argument_bytes": int(stats.argument_size_in_bytes),
           "output_bytes": int(stats.output_size_in_bytes),
           "alias_bytes": int(stats.alias_size_in_bytes),
           "temp_bytes": int(stats.temp_size_in_bytes),
           "code_bytes": int(getattr(stats, "generated_code_size_in_bytes", 0) or 0),
           "compile_seconds": seconds}
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                         + out["temp_bytes"] + out["code_bytes"])
    return out


def compile_decode_memory(cfg: ModelConfig, mesh, shape: DecodeShape) -> dict:
    """{"prefill": ..., "decode": ...}: XLA's per-device memory figures of the two compiled
    programs (greedy decoding, the whole answer in one loop, one EOS id)."""
    graphdef, state, prompts, carry, shardings = abstract_decode_inputs(cfg, mesh, shape)
    out = {}
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        compiled = decode.prefill.lower(graphdef, state, *prompts, carry.cache,
                                        shardings).compile()
        out["prefill"] = _memory(compiled, time.perf_counter() - start)
        start = time.perf_counter()
        compiled = decode.decode_chunk.lower(
            graphdef, state, carry, jax.ShapeDtypeStruct((), jnp.int32), shape.max_new_tokens,
            0.0, 1.0, shardings, jax.ShapeDtypeStruct((1,), jnp.int32)).compile()
        out["decode"] = _memory(compiled, time.perf_counter() - start)
    return out
