"""Tests for the sparse MoE block: Hugging Face parity, gradients, cost structure, LoRA.

Weight layouts (the HF mapping table relies on them; every rule is exercised below):
  transformers 5 in memory (MixtralSparseMoeBlock, module path `...mlp`):
    gate.weight [E, D]                -> router.kernel = gate.weight.T
    experts.gate_up_proj [E, 2F, D]   -> w_gate = gate_up_proj[:, :F, :].transpose(0, 2, 1)
                                         w_up   = gate_up_proj[:, F:, :].transpose(0, 2, 1)
    experts.down_proj [E, D, F]       -> w_down = down_proj.transpose(0, 2, 1)
  on disk (save_pretrained writes the original Mixtral names):
    model.layers.{i}.block_sparse_moe.gate.weight [E, D]        -> router.kernel = .T
    model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight [F, D] -> w_gate[e] = .T
    model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight [F, D] -> w_up[e]   = .T
    model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight [D, F] -> w_down[e] = .T
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from derta_jax.models.config import ModelConfig
from derta_jax.models.moe import MoE, add_expert_lora, load_balancing_loss, token_axes
from tests.fixtures_hf import tiny_mixtral_config

import torch

D, F, E, K = 48, 80, 4, 2  # the sizes of tests/fixtures_hf.tiny_mixtral_config


def jax_config(**changes) -> ModelConfig:
    base = ModelConfig(family="mixtral", hidden_size=D, intermediate_size=F, num_experts=E,
                       num_experts_per_tok=K)
    return base.replace(**changes).validate()


def hf_block(seed: int = 0):
    """A transformers MixtralSparseMoeBlock with weights large enough to route decisively."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(tiny_mixtral_config()).to(torch.float32).eval()
    with torch.no_grad():
        block.gate.weight.normal_(0.0, 0.3)
        block.experts.gate_up_proj.normal_(0.0, D ** -0.5)
        block.experts.down_proj.normal_(0.0, F ** -0.5)
    return block


def moe_from_hf_block(block, **changes) -> MoE:
    moe = MoE(jax_config(**changes), rngs=nnx.Rngs(0))
    gate_up = block.experts.gate_up_proj.detach().numpy()
    moe.router.kernel[...] = jnp.asarray(block.gate.weight.detach().numpy().T)
    moe.w_gate[...] = jnp.asarray(gate_up[:, :F, :].transpose(0, 2, 1))
    moe.w_up[...] = jnp.asarray(gate_up[:, F:, :].transpose(0, 2, 1))
    moe.w_down[...] = jnp.asarray(block.experts.down_proj.detach().numpy().transpose(0, 2, 1))
    return moe


def random_inputs(seed: int = 0, batch: int = 3, length: int = 7):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, length, D)).astype(np.float32)
    mask = np.ones((batch, length), bool)
    mask[0, 4:] = False  # right padding
    mask[2, :2] = False  # left padding
    return x, mask


@nnx.jit
def forward(moe: MoE, x, mask=None):
    """One compiled call (eager dispatch of every small op is slow on a shared CPU)."""
    return moe(jnp.asarray(x), None if mask is None else jnp.asarray(mask))


def hf_forward(block, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        y = block(torch.tensor(x)).numpy()
        logits, _, _ = block.gate(torch.tensor(x).reshape(-1, D))
    return y, logits.numpy()


# ----------------------------------------------------------------- Hugging Face parity


def test_matches_hf_block_outputs_and_router_logits():
    block = hf_block()
    moe = moe_from_hf_block(block)
    x, _ = random_inputs()
    want_y, want_logits = hf_forward(block, x)
    got_y, stats = forward(moe, x)
    np.testing.assert_allclose(np.asarray(got_y), want_y, atol=1e-5, rtol=0)
    got_logits = moe.router(jnp.asarray(x).reshape(-1, D))
    np.testing.assert_allclose(np.asarray(got_logits), want_logits, atol=1e-5, rtol=0)
    assert int(stats["dropped_tokens"]) == 0
    # Routing is decisive in this set-up: several experts are used, none by every token.
    load = np.asarray(stats["expert_load"])
    assert (load > 0).sum() >= 3 and load.max() < 1.0


def test_token_mask_keeps_real_outputs_and_zeroes_padding():
    block = hf_block(seed=1)
    moe = moe_from_hf_block(block)
    x, mask = random_inputs(seed=1)
    want_y, _ = hf_forward(block, x)
    got_y, stats = forward(moe, x, mask)
    got_y = np.asarray(got_y)
    np.testing.assert_allclose(got_y[mask], want_y[mask], atol=1e-5, rtol=0)
    assert np.all(got_y[~mask] == 0.0)
    assert float(stats["num_tokens"]) == mask.sum()


def test_aux_loss_matches_hf_load_balancing_loss_with_padding_mask():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    block = hf_block(seed=2)
    moe = moe_from_hf_block(block)
    layer_inputs = [random_inputs(seed=s)[0] for s in (2, 3)]
    _, mask = random_inputs()
    per_layer = [forward(moe, x, mask)[1] for x in layer_inputs]
    hf_logits = tuple(torch.from_numpy(hf_forward(block, x)[1]) for x in layer_inputs)
    torch_mask = torch.from_numpy(mask.astype(np.int64))

    want_one = load_balancing_loss_func(hf_logits[:1], E, K, torch_mask).item()
    np.testing.assert_allclose(float(per_layer[0]["aux_loss"]), want_one, rtol=1e-5)

    # Across layers HF pools the counts before the product; stacked [L, E] stats do the same.
    want_two = load_balancing_loss_func(hf_logits, E, K, torch_mask).item()
    got_two = load_balancing_loss(jnp.stack([s["expert_load"] for s in per_layer]),
                                  jnp.stack([s["router_prob"] for s in per_layer]), K)
    np.testing.assert_allclose(float(got_two), want_two, rtol=1e-5)
    mean_of_layers = np.mean([float(s["aux_loss"]) for s in per_layer])
    assert abs(mean_of_layers - want_two) > 1e-6  # the pooling order matters here

    want_unmasked = load_balancing_loss_func(hf_logits[:1], E, K, None).item()
    got_unmasked = forward(moe, layer_inputs[0])[1]["aux_loss"]
    np.testing.assert_allclose(float(got_unmasked), want_unmasked, rtol=1e-5)


def test_router_statistics_count_only_real_tokens():
    block = hf_block(seed=3)
    moe = moe_from_hf_block(block)
    x, mask = random_inputs(seed=3)
    _, logits = hf_forward(block, x)
    _, stats = forward(moe, x, mask)
    real = mask.reshape(-1)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    counts = np.zeros(E)
    for row in probs[real]:
        for expert in np.argsort(-row)[:K]:
            counts[expert] += 1
    np.testing.assert_allclose(np.asarray(stats["expert_load"]), counts / counts.sum(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["router_prob"]), probs[real].mean(0), atol=1e-6)
    log_z = np.log(np.exp(logits[real].astype(np.float64)).sum(-1))
    np.testing.assert_allclose(float(stats["router_z_loss"]), np.mean(log_z ** 2), rtol=1e-5)


def test_saved_checkpoint_layout_maps_by_transposition(hf_tiny_mixtral_dir):
    from safetensors import safe_open
    from transformers import MixtralForCausalLM

    prefix = "model.layers.1.block_sparse_moe."
    with safe_open(str(hf_tiny_mixtral_dir / "model.safetensors"), framework="numpy") as f:
        tensors = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    expected = {"gate.weight"} | {f"experts.{e}.{w}.weight"
                                  for e in range(E) for w in ("w1", "w2", "w3")}
    assert set(tensors) == expected
    moe = MoE(jax_config(), rngs=nnx.Rngs(0))
    moe.router.kernel[...] = jnp.asarray(tensors["gate.weight"].T)
    for ours, theirs in (("w_gate", "w1"), ("w_up", "w3"), ("w_down", "w2")):
        stacked = np.stack([tensors[f"experts.{e}.{theirs}.weight"].T for e in range(E)])
        getattr(moe, ours)[...] = jnp.asarray(stacked)

    hf_model = MixtralForCausalLM.from_pretrained(hf_tiny_mixtral_dir).eval()
    x = random_inputs(seed=4)[0]
    with torch.no_grad():
        want = hf_model.model.layers[1].mlp(torch.tensor(x)).numpy()
    scale = max(1.0, float(np.abs(want).max()))  # float32 rounding grows with the magnitude
    np.testing.assert_allclose(np.asarray(forward(moe, x)[0]), want, atol=1e-5 * scale, rtol=0)


# ------------------------------------------------------------------ gradients


def dense_reference(x, router, w_gate, w_up, w_down, chosen):
    """Per-token loop over each token's chosen experts; `chosen` is fixed (non-differentiable)."""
    tokens = x.reshape(-1, D)
    outputs = []
    for n, experts in enumerate(chosen):
        probs = jax.nn.softmax(tokens[n] @ router)
        total = sum(probs[e] for e in experts)
        out = jnp.zeros(D)
        for e in experts:
            hidden = jax.nn.silu(tokens[n] @ w_gate[e]) * (tokens[n] @ w_up[e])
            out = out + (probs[e] / total) * (hidden @ w_down[e])
        outputs.append(out)
    return jnp.stack(outputs).reshape(x.shape)


def test_gradients_equal_slow_dense_reference():
    block = hf_block(seed=5)
    moe = moe_from_hf_block(block)
    x = jnp.asarray(random_inputs(seed=5, length=2)[0])
    cotangent = jnp.asarray(np.random.default_rng(6).normal(size=x.shape).astype(np.float32))
    _, logits = hf_forward(block, np.asarray(x))
    chosen = [list(np.argsort(-row)[:K]) for row in logits]
    graphdef, state = nnx.split(moe)

    def ours(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x)[0] * cotangent)

    def reference(params, x):
        return jnp.sum(dense_reference(x, *params, chosen) * cotangent)

    got_state, got_x = jax.jit(jax.grad(ours, argnums=(0, 1)))(state, x)
    params = (moe.router.kernel[...], moe.w_gate[...], moe.w_up[...], moe.w_down[...])
    want_params, want_x = jax.jit(jax.grad(reference, argnums=(0, 1)))(params, x)
    got_params = (got_state["router"]["kernel"][...], got_state["w_gate"][...],
                  got_state["w_up"][...], got_state["w_down"][...])
    for got, want in zip((*got_params, got_x), (*want_params, want_x)):
        assert np.all(np.isfinite(np.asarray(got)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)
    assert float(jnp.abs(got_params[0]).max()) > 0  # the router learns through the weights


def test_gradients_under_jit_with_padding_are_finite_and_ignore_padding():
    moe = moe_from_hf_block(hf_block(seed=7))
    x, mask = random_inputs(seed=7)
    graphdef, state = nnx.split(moe)

    def loss(state, x):
        y, stats = nnx.merge(graphdef, state)(x, jnp.asarray(mask))
        return jnp.sum(y ** 2) + stats["aux_loss"]

    grads_state, grads_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, jnp.asarray(x))
    for leaf in jax.tree.leaves(grads_state):
        assert np.all(np.isfinite(np.asarray(leaf))) and float(jnp.abs(leaf).max()) > 0
    grads_x = np.asarray(grads_x)
    assert np.all(grads_x[~mask] == 0.0) and np.all(np.abs(grads_x[mask]).sum(-1) > 0)


# --------------------------------------------------------- cost grows with k, not E


def _walk(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (list, tuple)) else [param]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _walk(inner)


def matmul_flops(jaxpr) -> dict[str, int]:
    """Intrinsic multiply-add FLOPs of the dot_general and ragged_dot_general equations."""
    flops = {"dot_general": 0, "ragged_dot_general": 0}
    for eqn in _walk(jaxpr):
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            flops[name] += 2 * int(np.prod(out)) * int(np.prod([lhs[i] for i in lhs_contract]))
        elif name == "ragged_dot_general":
            rows, contract = eqn.invars[0].aval.shape
            flops[name] += 2 * rows * contract * eqn.outvars[0].aval.shape[-1]
    return flops


def forward_jaxpr(num_experts: int, top_k: int, tokens: int = 64):
    moe = MoE(jax_config(num_experts=num_experts, num_experts_per_tok=top_k), rngs=nnx.Rngs(0))
    x = jnp.ones((2, tokens // 2, D))
    return jax.make_jaxpr(lambda x: moe(x)[0])(x).jaxpr


def test_expert_flops_grow_with_top_k_not_with_number_of_experts():
    tokens = 64
    e4, e16 = matmul_flops(forward_jaxpr(4, 2)), matmul_flops(forward_jaxpr(16, 2))
    k1 = matmul_flops(forward_jaxpr(16, 1))
    expected_experts = 3 * 2 * (tokens * 2) * D * F  # gate, up, down for N*k rows
    assert e4["ragged_dot_general"] == e16["ragged_dot_general"] == expected_experts
    assert 2 * k1["ragged_dot_general"] == e16["ragged_dot_general"]
    # Dense matmuls: the router [N, D] @ [D, E] and the weighted sum over the k outputs.
    combine = 2 * tokens * 2 * D
    assert e4["dot_general"] == 2 * tokens * D * 4 + combine
    assert e16["dot_general"] == 2 * tokens * D * 16 + combine


def test_no_tokens_by_experts_by_hidden_intermediate():
    tokens, experts = 64, 16
    jaxpr = forward_jaxpr(experts, 2, tokens)
    largest = max(int(np.prod(v.aval.shape)) for eqn in _walk(jaxpr) for v in eqn.outvars
                  if hasattr(v.aval, "shape"))
    weight = experts * D * F
    assert largest <= max(weight, tokens * 2 * F) < tokens * experts * F


# ------------------------------------------------------------------ data parallelism


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_dispatch_runs_per_data_shard_under_an_ambient_mesh(axis_type):
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "expert"),
                         axis_types=(getattr(AxisType, axis_type),) * 3)
    moe = moe_from_hf_block(hf_block(seed=11))
    x, _ = random_inputs(seed=11, batch=8, length=6)
    mask = np.ones((8, 6), bool)
    mask[1, 3:] = False
    graphdef, state = nnx.split(moe)

    def loss(state, x, mask):
        y, stats = nnx.merge(graphdef, state)(x, mask)
        return jnp.sum(y ** 2) + stats["aux_loss"], (y, stats)

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, (want_y, want_stats)), want_grads = step(state, jnp.asarray(x), jnp.asarray(mask))
    fsdp = {"experts": "expert", "embed": "fsdp", "mlp": None, None: None}
    sharded_state = jax.tree.map(
        lambda v: v.replace(jax.device_put(v[...], NamedSharding(mesh, P(*[
            fsdp[name] for name in v.get_metadata()["out_sharding"]])))),
        state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        assert token_axes(8) == ("data", "fsdp") and token_axes(4) == ("data",)
        assert token_axes(3) == ()
        args = (sharded_state, jax.device_put(x, batch), jax.device_put(mask, batch))
        (_, (got_y, got_stats)), got_grads = step(*args)
        jaxpr = jax.make_jaxpr(lambda *a: loss(*a)[0])(*args).jaxpr
    np.testing.assert_allclose(np.asarray(got_y), np.asarray(want_y), atol=1e-5)
    for key in want_stats:
        np.testing.assert_allclose(np.asarray(got_stats[key]), np.asarray(want_stats[key]),
                                   rtol=1e-5)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
    # Each device sorts only its own tokens' assignments: 48 tokens * k=2 over 8 shards.
    sorts = [e.invars[0].aval.shape for e in _walk(jaxpr) if e.primitive.name == "sort"]
    assert sorts == [(48 * K // 8,)]
    with jax.set_mesh(mesh):  # a batch the token axes cannot split runs whole on each device
        odd_y, odd_stats = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(sharded_state, x[:3])
    np.testing.assert_allclose(np.asarray(odd_y), np.asarray(forward(moe, x[:3])[0]), atol=1e-5)


# ------------------------------------------------------------------ LoRA, dtypes, errors


def test_qwix_lora_skips_the_block_and_expert_lora_merges():
    import qwix

    x = jnp.asarray(random_inputs(seed=8)[0])
    base = MoE(jax_config(), rngs=nnx.Rngs(0))
    # qwix intercepts jax.lax.dot_general globally while it runs the model eagerly, and on
    # CPU jax lowers an eager ragged_dot through dot_general: without this eager warm-up
    # (which caches that lowering) apply_lora_to_model raises TraceContextError.
    want, _ = base(x)
    provider = qwix.LoraProvider(module_path=".*", rank=4, alpha=1.0)
    lora = qwix.apply_lora_to_model(base, provider, x, rngs=nnx.Rngs(1))
    # qwix 0.1.8 intercepts no ragged_dot, and the router matmul is not a module call.
    assert len(nnx.to_flat_state(nnx.state(lora, nnx.LoRAParam))) == 0

    moe = add_expert_lora(MoE(jax_config(), rngs=nnx.Rngs(0)), rank=4, alpha=8.0, rngs=nnx.Rngs(2))
    np.testing.assert_allclose(np.asarray(forward(moe, x)[0]), np.asarray(want), atol=1e-6)  # B = 0
    merged = MoE(jax_config(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(9)
    for name in ("w_gate", "w_up", "w_down"):
        lora_b = getattr(moe, f"{name}_lora_b")
        lora_b[...] = jnp.asarray(rng.normal(0, 0.05, lora_b.shape).astype(np.float32))
        delta = jnp.einsum("edr,erf->edf", getattr(moe, f"{name}_lora_a")[...], lora_b[...])
        getattr(merged, name)[...] = getattr(merged, name)[...] + 2.0 * delta  # alpha / rank
    got, _ = forward(moe, x)
    assert float(jnp.abs(got - want).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(got), np.asarray(forward(merged, x)[0]), atol=1e-5)


def test_expert_lora_on_layers_stacked_by_vmap_and_scanned():
    layers = 2

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return MoE(jax_config(), rngs=rngs)

    stack = add_expert_lora(make(nnx.Rngs(0)), rank=3, alpha=6.0, rngs=nnx.Rngs(1))
    assert stack.w_down_lora_a.shape == (layers, E, F, 3)
    assert stack.w_down_lora_a.get_metadata()["out_sharding"] == ("layers", "experts", "mlp", None)
    assert stack.w_gate_lora_b.get_metadata()["out_sharding"] == ("layers", "experts", None, "mlp")
    rng = np.random.default_rng(12)
    for name in ("w_gate", "w_up", "w_down"):
        lora_b = getattr(stack, f"{name}_lora_b")
        lora_b[...] = jnp.asarray(rng.normal(0, 0.05, lora_b.shape).astype(np.float32))
    x = jnp.asarray(random_inputs(seed=12)[0])

    @nnx.jit
    def scanned(stack, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, layer):
            return h + layer(h)[0]
        return body(x, stack)

    graphdef, state = nnx.split(stack)
    want = x
    for i in range(layers):
        want = want + forward(nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)), want)[0]
    np.testing.assert_allclose(np.asarray(scanned(stack, x)), np.asarray(want), atol=1e-5)
    first = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    with_lora = forward(first, x)[0]
    first.lora_scale = 0.0
    assert float(jnp.abs(with_lora - forward(first, x)[0]).max()) > 1e-3  # adapters in use


def test_bf16_compute_with_f32_params():
    block = hf_block(seed=10)
    x, _ = random_inputs(seed=10)
    want, _ = hf_forward(block, x)
    moe = moe_from_hf_block(block, dtype="bfloat16")
    got, stats = forward(moe, x)
    assert got.dtype == jnp.bfloat16 and moe.w_gate[...].dtype == jnp.float32
    assert stats["router_prob"].dtype == jnp.float32
    close = np.abs(np.asarray(got, np.float32) - want) <= 0.05 + 0.05 * np.abs(want)
    assert close.mean() > 0.95  # a few tokens may flip routing under bf16 logits


def test_parameters_carry_logical_axes():
    moe = MoE(jax_config(), rngs=nnx.Rngs(0))
    axes = {"/".join(map(str, path)): var.get_metadata()["out_sharding"]
            for path, var in nnx.to_flat_state(nnx.state(moe, nnx.Param))}
    assert axes == {"router/kernel": ("embed", None),
                    "w_gate": ("experts", "embed", "mlp"),
                    "w_up": ("experts", "embed", "mlp"),
                    "w_down": ("experts", "mlp", "embed")}


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"^model.num_experts=0: the MoE block needs >= 1 expert$"):
        MoE(ModelConfig(num_experts=0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError,
                       match=r"^model.num_experts_per_tok=5: must be in 1..num_experts=4$"):
        MoE(ModelConfig(num_experts=4, num_experts_per_tok=5), rngs=nnx.Rngs(0))
    moe = MoE(jax_config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError,
                       match=r"^MoE input must be \[batch, length, 48\], got \(2, 3, 5\)$"):
        moe(jnp.ones((2, 3, 5)))
    with pytest.raises(ValueError, match=r"^token_mask must be \[2, 3\], got \(2, 4\)$"):
        moe(jnp.ones((2, 3, D)), jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"^lora rank=0: must be a positive integer$"):
        add_expert_lora(moe, rank=0, alpha=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"unknown expert weights \['w_in'\]"):
        add_expert_lora(moe, rank=2, alpha=1.0, rngs=nnx.Rngs(0), weights=("w_in",))
