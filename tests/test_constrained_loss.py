"""Qi et al.'s token-wise constrained objective (derta_jax.constrained_loss) against a slow
per-token reference, and in the trainer's step.

The reference loops over rows, segments and positions in float64: each segment's next-token
positions in order get beta_first, beta_early (up to early_tokens) and beta_late, and the loss
-(2/beta) log sigmoid(beta (log p - log p_aligned)); refusal-target (RTO) positions keep the
plain negative log-likelihood; everything pooled over the supervised tokens.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from derta_jax import constrained_loss as C
from derta_jax import loss as L
from tests.test_loss import as_jax, place, random_rows, reference_nll, unembedding

CFG = L.LossConfig(objective="constrained_sft", chunk_size=8)
# Large betas everywhere so that every branch of the schedule changes the value.
STEEP = L.LossConfig(objective="constrained_sft", chunk_size=8, beta_first=0.7, beta_early=3.0,
                     early_tokens=3, beta_late=0.3)

constrained_loss = jax.jit(C.constrained_loss, static_argnums=6)


def reference_constrained(logits, aligned_logits, batch, cfg):
    """(loss, per-position gradient weight d loss / d nll) with explicit loops, float64."""
    num_rows, length = batch["targets"].shape
    terms, weight = [], np.zeros((num_rows, length))
    index_in_segment = {}
    for b in range(num_rows):
        for t in range(length):
            if not batch["loss_mask"][b, t]:
                continue
            nll = reference_nll(logits[b, t], batch["targets"][b, t])
            if batch["rto_mask"][b, t]:
                terms.append(nll)
                weight[b, t] = 1.0
                continue
            key = (b, int(batch["segment_ids"][b, t]))
            i = index_in_segment.get(key, 0)
            index_in_segment[key] = i + 1
            beta = cfg.beta_first if i == 0 else cfg.beta_early if i < cfg.early_tokens else cfg.beta_late
            log_ratio = reference_nll(aligned_logits[b, t], batch["targets"][b, t]) - nll
            terms.append(-(2 / beta) * math.log(1 / (1 + math.exp(-beta * log_ratio))))
            weight[b, t] = 2 / (1 + math.exp(beta * log_ratio))  # 2 sigmoid(-beta log-ratio)
    return sum(terms) / len(terms), weight / len(terms)


def _inputs(layout, seed=0):
    rows = random_rows(seed, 10)
    batch, hidden, _ = place(rows, layout)
    aligned_hidden = hidden + np.random.default_rng(seed + 7).normal(size=hidden.shape) * 0.5
    return batch, hidden, aligned_hidden, unembedding()


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("cfg", [CFG, STEEP], ids=["paper", "steep"])
def test_loss_matches_the_per_token_reference(layout, cfg):
    batch, hidden, aligned_hidden, w = _inputs(layout)
    expected, _ = reference_constrained(hidden @ w, aligned_hidden @ w, batch, cfg)
    loss, sums = constrained_loss(jnp.asarray(hidden, jnp.float32), jnp.asarray(w, jnp.float32),
                                  jnp.asarray(aligned_hidden, jnp.float32),
                                  jnp.asarray(w, jnp.float32), as_jax(batch), None, cfg)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    metrics = C.finalize_metrics(sums)
    mle = batch["loss_mask"] & ~batch["rto_mask"]
    policy = np.array([reference_nll((hidden @ w)[b, t], batch["targets"][b, t])
                       for b, t in zip(*np.nonzero(mle))])
    aligned = np.array([reference_nll((aligned_hidden @ w)[b, t], batch["targets"][b, t])
                        for b, t in zip(*np.nonzero(mle))])
    assert float(metrics["mle_loss"]) == pytest.approx(policy.mean(), rel=1e-5)
    assert float(metrics["aligned_mle_loss"]) == pytest.approx(aligned.mean(), rel=1e-5)
    assert float(metrics["log_ratio"]) == pytest.approx((aligned - policy).mean(), rel=1e-4)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gradient_is_the_sft_gradient_scaled_per_token(layout):
    """The paper's appendix D.2: d loss = sum_t 2 sigmoid(-beta_t log-ratio_t) d nll_t / N,
    and nothing flows into the aligned model."""
    batch, hidden, aligned_hidden, w = _inputs(layout, seed=3)
    _, weight = reference_constrained(hidden @ w, aligned_hidden @ w, batch, STEEP)
    h, a, u = (jnp.asarray(x, jnp.float32) for x in (hidden, aligned_hidden, w))

    def loss(h, a):
        return C.constrained_loss(h, u, a, u, as_jax(batch), None, STEEP)[0]

    def weighted_nll(h):
        return jnp.sum(jnp.asarray(weight, jnp.float32) * L.nll_from_logits(h @ u, batch["targets"]))

    d_hidden, d_aligned = jax.jit(jax.grad(loss, argnums=(0, 1)))(h, a)
    expected = jax.jit(jax.grad(weighted_nll))(h)
    assert float(jnp.abs(expected).max()) > 1e-3
    np.testing.assert_allclose(d_hidden, expected, rtol=1e-4, atol=1e-6)
    assert not np.asarray(d_aligned).any()


def test_where_the_models_agree_it_is_plain_sft():
    """Same hidden states for both models: every weight is 2 sigmoid(0) = 1, so the gradient
    is the DeRTa loss's (MLE and RTO pooled), whatever the betas."""
    batch, hidden, _, w = _inputs("packed", seed=5)
    h, u = jnp.asarray(hidden, jnp.float32), jnp.asarray(w, jnp.float32)
    d_constrained = jax.jit(jax.grad(
        lambda h: C.constrained_loss(h, u, h, u, as_jax(batch), None, STEEP)[0]))(h)
    d_sft = jax.jit(jax.grad(lambda h: L.derta_loss(h, u, as_jax(batch), None, STEEP)[0]))(h)
    np.testing.assert_allclose(d_constrained, d_sft, rtol=1e-5, atol=1e-7)


def test_betas_follow_each_segments_response_tokens():
    batch, *_ = _inputs("packed", seed=2)
    betas = np.asarray(C.token_betas(as_jax(batch), STEEP))
    mle = batch["loss_mask"] & ~batch["rto_mask"]
    for b in range(batch["targets"].shape[0]):
        for segment in set(batch["segment_ids"][b][mle[b]]):
            positions = np.nonzero(mle[b] & (batch["segment_ids"][b] == segment))[0]
            expected = [0.7] + [3.0] * 2 + [0.3] * (len(positions) - 3)
            np.testing.assert_allclose(betas[b, positions], expected[:len(positions)], rtol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("objective", "dpo", "must be one of"), ("beta_first", 0.0, "> 0"),
    ("beta_late", float("nan"), "> 0"), ("early_tokens", 0, ">= 1")])
def test_bad_settings_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=f"loss.{field}=.*{message}"):
        L.LossConfig(**{field: value}).validate()


# ----------------------------------------------------------------------------- the trainer


def _metrics(workdir):
    import json

    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_trainer_starts_as_sft_and_then_constrains(tmp_path, small_tokenizer, lora):
    """From an HF model, full fine-tuning (a frozen copy of the start) and LoRA (the base with
    the adapters off): at step 1 the policy IS the aligned model, so the log-ratio is 0, the
    aligned model's loss is the policy's and the gradient is the DeRTa loss's (same norm); the
    loss values differ ((2 / beta) log 2 per next-token position). After a step they part."""
    from derta_jax.train.loop import run
    from tests.test_train_from_hf import _hf_model_dir, _world_config

    hf_dir, _ = _hf_model_dir(tmp_path, small_tokenizer)
    runs = {}
    for objective in ("derta", "constrained_sft"):
        config = _world_config(tmp_path, tmp_path / objective)
        config.model.update(hf_dir=str(hf_dir), scan_layers=False)
        config.loss.objective = objective
        config.optim.update(lr=1e-2, warmup_ratio=0.0, schedule="constant")
        if lora:
            config.lora.update(enabled=True, rank=4, dropout=0.0)
        run(config)
        runs[objective] = _metrics(tmp_path / objective)
    sft, constrained = runs["derta"], runs["constrained_sft"]
    assert len(constrained) == 2
    first = constrained[0]
    assert first["log_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert first["aligned_mle_loss"] == pytest.approx(first["mle_loss"], rel=1e-6)
    assert first["mle_loss"] == pytest.approx(sft[0]["mle_loss"], rel=1e-6)
    assert first["grad_norm"] == pytest.approx(sft[0]["grad_norm"], rel=1e-4)
    assert first["loss"] > sft[0]["loss"] + 1.0  # (2 / beta) log 2 >= 0.55 per token
    assert abs(constrained[1]["log_ratio"]) > 1e-4  # the policy has moved from the start


def test_the_objective_needs_a_model_to_stay_close_to(tmp_path):
    from derta_jax.train.config import ConfigError
    from derta_jax.train.loop import run
    from tests.test_train_from_hf import _world_config

    config = _world_config(tmp_path, tmp_path / "run")
    config.loss.objective = "constrained_sft"
    with pytest.raises(ConfigError, match="loss.objective='constrained_sft': .*model.init_from"):
        run(config)
    assert not (tmp_path / "run").exists()


def test_the_planner_prices_the_frozen_copy_of_a_full_fine_tune():
    import jax

    from derta_jax.train import mesh as mesh_lib
    from derta_jax.train.config import apply_preset, build_model_config, default_config
    from derta_jax.train.plan_memory import state_memory

    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1},
                              devices=jax.devices()[:1])
    memory = {}
    for lora in (False, True):
        for objective in ("derta", "constrained_sft"):
            config = default_config()
            apply_preset(config, "tiny")
            config.lora.enabled = lora
            config.loss.objective = objective
            memory[lora, objective] = state_memory(config, build_model_config(config), mesh)
    plain, constrained = memory[False, "derta"], memory[False, "constrained_sft"]
    assert constrained.params_bytes == 2 * plain.params_bytes
    assert constrained.grads_bytes == plain.grads_bytes and constrained.opt_bytes == plain.opt_bytes
    assert constrained.param_count == plain.param_count
    assert memory[True, "constrained_sft"] == memory[True, "derta"]  # the base, adapters off
