"""Token-wise constrained fine-tuning (Qi et al. 2024, "Safety Alignment Should Be Made More
Than Just a Few Tokens Deep", ICLR 2025, section 4), as a loss for the same training step.

Why: fine-tuning an aligned model, even on benign data, erodes its refusals, and a few steps on
harmful pairs remove them. Qi et al. keep the fine-tuned policy close to the frozen aligned
model token by token, most strongly on the first response tokens where refusals are decided:

    loss_t = -(2 / beta_t) log sigmoid(beta_t * (log pi(y_t | ...) - log pi_aligned(y_t | ...)))
           =  (2 / beta_t) softplus(beta_t * (nll_t - nll_aligned_t))

beta_t = loss.beta_first on the first response token, loss.beta_early on the others among the
first loss.early_tokens, loss.beta_late after (the paper: 0.5, 2, 0.1 over 5 tokens). Its
gradient is 2 sigmoid(beta_t (nll_t - nll_aligned_t)) times the SFT gradient: 1 where the
two models agree (plain SFT), vanishing once the policy is more than ~1/beta_t nats more
likely than the aligned model, so a large beta freezes the first tokens. As beta -> 0 the
loss is SFT's up to a constant.

Differences from the paper's code (Unispac/shallow-vs-deep-alignment), by design:
  * the exact loss is differentiated; the reference code multiplies the log-likelihood by the
    detached weight clamped at >= 1e-3 (the same gradient except where the weight is < 1e-3);
  * a token's index t counts the supervised next-token positions of its own packed segment
    (one response), not of the whole padded row;
  * positions whose target is the refusal id (RTO rows of a DeRTa mixture) keep the DeRTa
    RTO term (negative log-likelihood of the refusal id); the constraint applies to the
    next-token (MLE) positions, with the DeRTa loss's weights and global denominators.
Qi et al.'s data augmentation (harmful prefixes of 1-100 tokens before a refusal) is the
project's `prefix` recipe (harmful-prefix MLE); docs/robustness.md compares the two.

The aligned model's log-probabilities come from a second forward pass in the same step
(derta_jax.train.step): with LoRA the base with the adapters off, with full fine-tuning a
frozen copy of the starting weights.
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
from jax import lax

from derta_jax import loss as derta

F32 = jnp.float32


def token_betas(batch: Mapping[str, jax.Array], cfg: derta.LossConfig) -> jax.Array:
    """Float32 [B, T]: beta of each next-token position by its index among its segment's
    next-token positions (0 = the first response token); beta_late elsewhere."""
    mle, _ = derta.active_masks(batch)
    by_position = lax.broadcasted_iota(jnp.int32, mle.shape, 1)
    rank, _ = derta.rank_within_segment(mle, batch["segment_ids"], by_position)
    beta = jnp.where(rank == 0, cfg.beta_first,
                     jnp.where(rank < cfg.early_tokens, cfg.beta_early, cfg.beta_late))
    return jnp.where(mle, beta, cfg.beta_late).astype(F32)


def constrained_token_loss(nll: jax.Array, aligned_nll: jax.Array, beta: jax.Array) -> jax.Array:
    """(2 / beta) softplus(beta (nll - aligned_nll)): -(2/beta) log sigmoid(beta log-ratio)."""
    return 2.0 / beta * jax.nn.softplus(beta * (nll - aligned_nll))


def constrained_loss_from_nll(nll: jax.Array, aligned_nll: jax.Array,
                              batch: Mapping[str, jax.Array], rng: Optional[jax.Array],
                              cfg: derta.LossConfig,
                              global_counts: Optional[derta.TokenCounts] = None):
    """(loss, metric sums) from the policy's and the aligned model's nll [B, T]. The sums are
    the DeRTa loss's (mle_loss is still the policy's nll) plus the mean log-ratio
    log pi - log pi_aligned and the aligned model's nll over the next-token positions."""
    aligned_nll = lax.stop_gradient(aligned_nll)
    mle, _ = derta.active_masks(batch)
    beta = token_betas(batch, cfg)
    per_position = jnp.where(mle, constrained_token_loss(nll, aligned_nll, beta), nll)
    loss, sums = derta.loss_from_nll(nll, batch, rng, cfg, global_counts, per_position)
    sums["log_ratio_sum"] = jnp.sum(jnp.where(mle, aligned_nll - nll, 0.0))
    sums["aligned_nll_sum"] = jnp.sum(jnp.where(mle, aligned_nll, 0.0))
    return loss, sums


def constrained_loss(hidden: jax.Array, unembedding: jax.Array, aligned_hidden: jax.Array,
                     aligned_unembedding: jax.Array, batch: Mapping[str, jax.Array],
                     rng: Optional[jax.Array], cfg: derta.LossConfig,
                     global_counts: Optional[derta.TokenCounts] = None):
    """The training loss from both models' final hidden states [B, T, D] (chunked nll)."""
    cfg.validate()
    derta.check_batch(batch)
    nll = derta.chunked_nll(hidden, unembedding, batch["targets"], cfg.chunk_size)
    aligned_nll = derta.chunked_nll(lax.stop_gradient(aligned_hidden),
                                    lax.stop_gradient(aligned_unembedding), batch["targets"],
                                    cfg.chunk_size)
    return constrained_loss_from_nll(nll, aligned_nll, batch, rng, cfg, global_counts)


def finalize_metrics(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The DeRTa metrics plus `log_ratio` and `aligned_mle_loss` (means over MLE tokens)."""
    metrics = derta.finalize_metrics(sums)
    tokens = sums["mle_tokens"]
    for name, key in (("log_ratio", "log_ratio_sum"), ("aligned_mle_loss", "aligned_nll_sum")):
        metrics[name] = jnp.where(tokens > 0, sums[key] / jnp.maximum(tokens, 1), jnp.nan)
    return metrics
