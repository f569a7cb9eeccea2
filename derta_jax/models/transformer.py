"""The decoder-only Transformer for the Llama / Mistral / Mixtral families (Flax NNX).

Why: one model class serves training (packed or padded batches, optional remat and
scanned layers), evaluation and KV-cache decoding, with the API fixed in DESIGN.md:

    hidden, aux = model(input_ids, positions, segment_ids)   # hidden [B,T,D] after final norm
    w = model.unembedding()                                  # [D, V] in compute dtype
    logits = model.logits(hidden)                            # float32, for decode/eval only

Parameter paths (the HF name table in derta_jax/hf/mapping.py is written against them):

    embedder.embedding                         [V, D]
    layers.{i}.attn_norm.scale                 [D]
    layers.{i}.attn.{q,k,v}_proj.kernel        [D, H|K, Hd]
    layers.{i}.attn.o_proj.kernel              [H, Hd, D]
    layers.{i}.mlp_norm.scale                  [D]
    layers.{i}.mlp.{gate,up}_proj.kernel       [D, F]      (dense)
    layers.{i}.mlp.down_proj.kernel            [F, D]
    layers.{i}.moe.router.kernel               [D, E]      (Mixtral, derta_jax/models/moe.py)
    layers.{i}.moe.w_gate / w_up               [E, D, F]
    layers.{i}.moe.w_down                      [E, F, D]
    final_norm.scale                           [D]
    lm_head.kernel                             [D, V]      (untied only)

With `scan_layers=True` the `{i}` level disappears and every layer parameter gains a
leading axis named "layers" (one compiled layer body, fast compiles at 80 layers).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from derta_jax.models.attention import Attention, KVCache
from derta_jax.models.config import ModelConfig
from derta_jax.models.layers import Embedder, Projection, RMSNorm, SwiGLU


def remat_policy(name: str):
    """(wrap?, jax checkpoint policy) for config.remat_policy."""
    policies = {
        "none": (False, None),
        "full": (True, None),  # save nothing, recompute the layer in the backward pass
        "dots": (True, jax.checkpoint_policies.checkpoint_dots),
        "dots_no_batch": (True, jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims),
        "save_attn_out": (True, jax.checkpoint_policies.save_only_these_names("attn_out")),
    }
    if name not in policies:
        raise ValueError(f"model.remat_policy={name!r}: must be one of {tuple(policies)}")
    return policies[name]


def _moe_class():
    try:
        from derta_jax.models.moe import MoE
    except ImportError as err:  # the MoE block lives in its own module
        raise NotImplementedError(
            "model.num_experts > 0 needs derta_jax/models/moe.py (class MoE)") from err
    return MoE


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); ffn = SwiGLU or MoE."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        if config.is_moe:
            self.moe = _moe_class()(config, rngs=rngs)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, **kw)

    def __call__(self, x, positions, segment_ids, cache=None, cache_segment_ids=None,
                 cache_index=None, layer=None):
        """-> (x [B,T,D], aux dict, updated (k, v) of every layer, or None).
        cache: every layer's (k, v); this one writes its slots of layer `layer`."""
        attn_out, new_cache = self.attn(self.attn_norm(x), positions, segment_ids, cache,
                                        cache_segment_ids, cache_index, layer)
        x = x + attn_out
        h = self.mlp_norm(x)
        if hasattr(self, "moe"):
            ffn_out, aux = self.moe(h, token_mask=segment_ids != 0)  # padding: no expert work
        else:
            ffn_out, aux = self.mlp(h), {}
        return x + ffn_out.astype(x.dtype), aux, new_cache


def _layer_step(layer: DecoderLayer, x, positions, segment_ids, cache, cache_segment_ids,
                cache_index, index):
    return layer(x, positions, segment_ids, cache, cache_segment_ids, cache_index, index)


class Transformer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        self.embedder = Embedder(config.vocab_size, config.hidden_size, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
        if config.scan_layers:
            @nnx.split_rngs(splits=config.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=config.num_layers,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_layers(layer_rngs):
                return DecoderLayer(config, rngs=layer_rngs)

            self.layers = make_layers(rngs)
        else:
            self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
        if not config.tie_embeddings:
            self.lm_head = Projection("btd,dv->btv", (config.hidden_size, config.vocab_size),
                                      ("embed", "vocab"), dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)

    # -- public API -------------------------------------------------------------------

    def __call__(self, input_ids: jax.Array, positions: Optional[jax.Array] = None,
                 segment_ids: Optional[jax.Array] = None, collect_residuals: bool = False):
        """input_ids/positions/segment_ids [B, T] -> (hidden [B, T, D], aux dict).
        collect_residuals: aux["residuals"] [L, B, D] is the residual stream entering each
        layer at the LAST position (a left-padded prompt's last token; what the refusal
        direction is read from, eval/refusal_direction.py)."""
        positions, segment_ids = _default_positions_and_segments(input_ids, positions, segment_ids)
        x = self.embedder(input_ids)
        x, aux, _ = self._run_layers(x, positions, segment_ids, None, None, None,
                                     collect_residuals)
        return self.final_norm(x), aux

    def forward_with_cache(self, input_ids: jax.Array, positions: jax.Array,
                           segment_ids: jax.Array, cache: KVCache):
        """Prefill or decode step: writes T tokens at cache.index, -> (hidden, aux, cache)."""
        t = input_ids.shape[1]
        cache_segment_ids = jax.lax.dynamic_update_slice(
            cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.index))
        x = self.embedder(input_ids)
        x, aux, (k, v) = self._run_layers(x, positions, segment_ids, (cache.k, cache.v),
                                          cache_segment_ids, cache.index)
        new_cache = KVCache(k=k, v=v, segment_ids=cache_segment_ids, index=cache.index + t)
        return self.final_norm(x), aux, new_cache

    def unembedding(self) -> jax.Array:
        """[D, V] in compute dtype (the embedding transposed when embeddings are tied)."""
        dtype = jnp.dtype(self.config.dtype)
        if self.config.tie_embeddings:
            return self.embedder.embedding[...].T.astype(dtype)
        return self.lm_head.kernel[...].astype(dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, T, D] -> float32 logits [B, T, V]; for decoding and evaluation only."""
        return jnp.einsum("btd,dv->btv", hidden, self.unembedding(),
                          preferred_element_type=jnp.float32)

    # -- layers -----------------------------------------------------------------------

    def _run_layers(self, x, positions, segment_ids, cache, cache_segment_ids, cache_index,
                    collect_residuals: bool = False):
        wrap, policy = remat_policy(self.config.remat_policy)
        if self.config.scan_layers:
            return self._scan(x, positions, segment_ids, cache, cache_segment_ids, cache_index,
                              wrap, policy, collect_residuals)
        step = nnx.remat(_layer_step, policy=policy) if wrap else _layer_step
        layer_aux, residuals = [], []
        for i, layer in enumerate(self.layers):
            residuals.append(x[:, -1])
            x, aux, cache = step(layer, x, positions, segment_ids, cache, cache_segment_ids,
                                 cache_index, i)
            layer_aux.append(aux)
        stacked_aux = jax.tree.map(lambda *xs: jnp.stack(xs), *layer_aux) if layer_aux[0] else {}
        aux = _combine_layers(stacked_aux, self.config.num_experts_per_tok)
        if collect_residuals:
            aux["residuals"] = jnp.stack(residuals)
        return x, aux, cache

    def _scan(self, x, positions, segment_ids, cache, cache_segment_ids, cache_index, wrap, policy,
              collect_residuals: bool = False):
        """One compiled layer body; the KV cache (when given) rides in the carry, so each
        layer writes its slots in place."""
        def body(layer, carry, index):
            y, cache = carry
            entering = y[:, -1]
            y, aux, cache = layer(y, positions, segment_ids, cache, cache_segment_ids,
                                  cache_index, index)
            return (y, cache), (aux, entering) if collect_residuals else aux

        if wrap:
            body = nnx.remat(body, policy=policy, prevent_cse=False)
        layer_axes = nnx.StateAxes({nnx.Param: 0, ...: None})  # stacked weights; other state broadcast
        scan = nnx.scan(body, in_axes=(layer_axes, nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                        transform_metadata={nnx.PARTITION_NAME: "layers"})
        (x, cache), stacked = scan(self.layers, (x, cache),
                                   jnp.arange(self.config.num_layers, dtype=jnp.int32))
        stacked_aux, residuals = stacked if collect_residuals else (stacked, None)
        aux = _combine_layers(stacked_aux, self.config.num_experts_per_tok)
        if collect_residuals:
            aux["residuals"] = residuals
        return x, aux, cache


def _combine_layers(stacked_aux: dict, top_k: int) -> dict:
    """Per-layer router statistics [L, ...] -> model-level ones.

    Each statistic is averaged over layers, except the load-balancing loss, which is
    recomputed from the stacked per-layer loads and probabilities: moe.load_balancing_loss
    pools the layers before taking the product, as Hugging Face's Mixtral does (a mean of
    per-layer losses would differ). `expert_load_per_layer` and `router_prob_per_layer`
    [L, E] are kept for metrics.
    """
    aux = {key: jnp.mean(value, axis=0) for key, value in stacked_aux.items()}
    if "aux_loss" in stacked_aux:
        from derta_jax.models.moe import load_balancing_loss

        aux["aux_loss"] = load_balancing_loss(stacked_aux["expert_load"], stacked_aux["router_prob"], top_k)
        aux["expert_load_per_layer"] = stacked_aux["expert_load"]
        aux["router_prob_per_layer"] = stacked_aux["router_prob"]
    return aux


def _default_positions_and_segments(input_ids, positions, segment_ids):
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    if segment_ids is None:
        segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    return positions, segment_ids
