"""Presets have the published sizes; parameters carry logical axis names; the dtype and
remat policies do what the config says; Qwix LoRA finds every projection."""

import flax.core.spmd
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from derta_jax.models import layers
from derta_jax.models.presets import PRESETS, get_preset
from derta_jax.weights import abstract_params, param_count
from derta_jax.models.transformer import Transformer

PUBLISHED_BILLIONS = {"mistral7b": 7.24, "llama3_8b": 8.03, "llama3_70b": 70.55, "mixtral8x7b": 46.70}


def slow_count(config):
    """Parameter count from the architecture formula, independent of the model code."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    attention = d * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
    ffn = 3 * d * f * max(config.num_experts, 1) + d * config.num_experts
    per_layer = attention + ffn + 2 * d
    return v * d * (1 if config.tie_embeddings else 2) + config.num_layers * per_layer + d


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_preset_parameter_counts_match_published(name):
    # Scanned: one layer is traced, so even 70B counts in a second; nothing is allocated.
    count = param_count(get_preset(name, scan_layers=True))
    assert abs(count / 1e9 - PUBLISHED_BILLIONS[name]) <= 0.005 * PUBLISHED_BILLIONS[name]
    assert count == slow_count(PRESETS[name])


def test_scanned_and_unscanned_have_the_same_count():
    tiny = get_preset("tiny")
    assert param_count(tiny) == param_count(tiny.replace(scan_layers=True)) == slow_count(tiny)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match=r"^model.preset='llama4': unknown preset \(known: \["):
        get_preset("llama4")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_parameter_has_logical_axis_names(scan_layers):
    config = get_preset("tiny", scan_layers=scan_layers, tie_embeddings=False)
    flat = nnx.to_flat_state(abstract_params(config))
    assert len(flat) > 0
    for path, variable in flat:
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(variable.shape), path
        assert set(axes) <= set(layers.LOGICAL_AXES), path
        assert (axes[0] == "layers") == (scan_layers and path[0] == "layers"), path
    # a trainer maps them to mesh axes with a rule table
    rules = (("layers", None), ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"),
             ("kv_heads", "tensor"), ("head_dim", None), ("mlp", "tensor"))
    with flax.core.spmd.logical_axis_rules(rules):
        specs = dict(nnx.to_flat_state(nnx.get_partition_spec(abstract_params(config))))
    q_path = ("layers", "attn", "q_proj", "kernel") if scan_layers else ("layers", 0, "attn", "q_proj", "kernel")
    expected = ((None,) if scan_layers else ()) + ("fsdp", "tensor", None)
    assert specs[q_path].get_value() == jax.sharding.PartitionSpec(*expected)


def test_dtype_policy_keeps_params_and_computes_in_bfloat16():
    config = get_preset("tiny", dtype="bfloat16", param_dtype="float32")
    model = Transformer(config, rngs=nnx.Rngs(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    forward = nnx.jit(lambda m: (m(ids)[0], m.unembedding(), m.logits(m(ids)[0])))
    hidden, unembedding, logits = forward(model)
    assert hidden.dtype == jnp.bfloat16 and unembedding.dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32
    reference = nnx.jit(lambda m: m(ids)[0])(Transformer(config.replace(dtype="float32"), rngs=nnx.Rngs(0)))
    np.testing.assert_allclose(np.asarray(hidden, np.float32), np.asarray(reference), atol=0.1, rtol=0.05)
    params16 = abstract_params(get_preset("tiny", param_dtype="bfloat16", dtype="bfloat16"))
    assert {leaf.dtype for leaf in jax.tree.leaves(params16)} == {jnp.dtype("bfloat16")}


def _loss_and_grads(config, ids):
    model = Transformer(config, rngs=nnx.Rngs(0))

    def loss_fn(m):
        hidden, _ = m(ids)
        return jnp.mean(m.logits(hidden) ** 2)

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    return loss, grads


@pytest.mark.parametrize("scan_layers,policy", [(False, "full"), (True, "dots"),
                                                (True, "save_attn_out")])
def test_remat_policies_change_memory_not_results(scan_layers, policy):
    ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    base = get_preset("tiny", scan_layers=scan_layers)
    ref_loss, ref_grads = _loss_and_grads(base, ids)
    loss, grads = _loss_and_grads(base.replace(remat_policy=policy), ids)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_full_remat_recomputes_the_forward_in_the_backward_pass():
    ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)

    def count_dots(policy):
        model = Transformer(get_preset("tiny", remat_policy=policy), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def loss(state):
            return jnp.sum(nnx.merge(graphdef, state)(ids)[0])

        return jax.jit(jax.grad(loss)).lower(state).as_text().count("dot_general")

    assert count_dots("full") > count_dots("none")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_qwix_lora_adapts_every_projection(scan_layers):
    """Qwix LoRA intercepts the einsum of every projection; with scanned layers the
    adapters are created inside the scan and come out stacked on the "layers" axis."""
    config = get_preset("tiny", tie_embeddings=False, scan_layers=scan_layers)
    model = Transformer(config, rngs=nnx.Rngs(0))
    ids = jnp.arange(8, dtype=jnp.int32)[None]
    base, _ = model(ids)
    provider = qwix.LoraProvider(module_path=r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                                 rank=4, alpha=8.0)
    lora_model = qwix.apply_lora_to_model(model, provider, ids, rngs=nnx.Rngs(1))
    lora_state = nnx.to_flat_state(nnx.state(lora_model, nnx.LoRAParam))
    adapted = {path[:-1] for path, _ in lora_state}
    layer_keys = [()] if scan_layers else [(i,) for i in range(config.num_layers)]
    expected = {("layers",) + key + (block, proj)
                for key in layer_keys
                for block, projs in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                     ("mlp", ("gate_proj", "up_proj", "down_proj")))
                for proj in projs}
    assert adapted == expected
    for _, variable in lora_state:
        if scan_layers:
            assert variable.shape[0] == config.num_layers
            assert variable.get_metadata()["out_sharding"][0] == "layers"
    unchanged, _ = lora_model(ids)  # B starts at zero: the adapted model is the base model
    np.testing.assert_allclose(unchanged, base, atol=1e-6)
    q_proj = lora_model.layers.attn.q_proj if scan_layers else lora_model.layers[0].attn.q_proj
    q_proj.kernel_lora_b[...] = jnp.ones_like(q_proj.kernel_lora_b[...])
    changed, _ = lora_model(ids)
    assert np.abs(np.asarray(changed) - np.asarray(base)).max() > 1e-3
    grads = nnx.grad(lambda m: jnp.sum(m(ids)[0] ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(lora_model)
    q_path = ("layers",) + layer_keys[0] + ("attn", "q_proj")
    q_grads = [g for path, g in nnx.to_flat_state(grads) if path[:-1] == q_path]
    assert len(q_grads) == 2 and all(float(jnp.abs(g[...]).max()) > 0 for g in q_grads)
