"""The DeRTa loss: masked MLE plus Refusal Training at every position, in one forward pass.

This is the file to check against the paper's objective (Yuan et al. 2024, arXiv 2407.09121):

    L = - lambda_mle sum_{MLE t} log P(x_{t+1} | x_<=t) - lambda_rto sum_{kept RTO t} log P(sorry | x_<=t)
        --------------------------------------------------------------------------------------------------
                  number of active tokens (MLE + kept RTO) in the GLOBAL batch        ("pooled", default)

with lambda_mle = lambda_rto = 1 in the reference; or, with normalization="per_term",
lambda_mle * (mean over MLE tokens) + lambda_rto * (mean over kept RTO tokens). The Batch
contract (DESIGN.md) already puts the next token (MLE) or the refusal id (RTO) in `targets`,
so both terms are one negative log-likelihood of `targets`; they differ only in weights.

Why the pieces are separate pure functions:
  * `rto_keep_mask`: the paper's "dropout for the sorry token" keeps max(1, ceil(n * rate)) of
    the n RTO positions of each row. The kept COUNT depends only on the masks, so
  * `token_counts` can compute the global denominators once per step, before the trainer's
    micro-batch scan, without a forward pass; then
  * `position_weights` turns them into weights with loss = sum(weights * nll), so micro-batches
    and devices add up to sum/sum over the global batch, never a mean of means.
  * `chunked_nll` never materialises [B, T, V] logits for the whole sequence (V = 128k): it
    scans over sequence chunks, and its custom backward recomputes each chunk's logits.
  * `derta_loss` puts them together and returns metric SUMS (add them across micro-batches and
    devices), which `finalize_metrics` turns into means.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
from typing import Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

NORMALIZATIONS = ("pooled", "per_term")
OBJECTIVES = ("derta", "constrained_sft")  # constrained_sft: derta_jax/constrained_loss.py
LOSS_BATCH_KEYS = ("targets", "loss_mask", "rto_mask", "segment_ids")
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class LossConfig:
    normalization: str = "pooled"  # "pooled": one token mean (the reference); "per_term"
    lambda_mle: float = 1.0
    lambda_rto: float = 1.0
    rto_keep_rate: float = 1.0  # 1.0 keeps every RTO position; the paper's 7B/8B full FT: 0.05
    chunk_size: int = 256  # sequence positions per chunk of the chunked cross-entropy
    num_position_buckets: int = 4  # P(refusal) probe by relative depth in the harmful answer
    # "constrained_sft": the next-token term becomes Qi et al. 2024's token-wise constrained
    # objective against the frozen starting model (derta_jax/constrained_loss.py); per-token
    # beta: `beta_first` on the first response token, `beta_early` on the rest of the first
    # `early_tokens`, `beta_late` after (the paper's 0.5 / 2 / 0.1 over 5 tokens).
    objective: str = "derta"
    beta_first: float = 0.5
    beta_early: float = 2.0
    early_tokens: int = 5
    beta_late: float = 0.1

    def validate(self) -> "LossConfig":
        def check(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ValueError(f"loss.{field}={getattr(self, field)!r}: {why}")

        def is_number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def is_count(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        check(self.normalization in NORMALIZATIONS, "normalization", f"must be one of {NORMALIZATIONS}")
        for field in ("lambda_mle", "lambda_rto"):
            check(is_number(getattr(self, field)) and getattr(self, field) >= 0, field,
                  "must be a finite number >= 0")
        check(is_number(self.rto_keep_rate) and 0 < self.rto_keep_rate <= 1, "rto_keep_rate",
              "must be in (0, 1] (1.0 keeps every RTO position)")
        check(is_count(self.chunk_size), "chunk_size", "must be an integer >= 1")
        check(is_count(self.num_position_buckets), "num_position_buckets", "must be an integer >= 1")
        check(self.objective in OBJECTIVES, "objective", f"must be one of {OBJECTIVES}")
        for field in ("beta_first", "beta_early", "beta_late"):
            check(is_number(getattr(self, field)) and getattr(self, field) > 0, field,
                  "must be a finite number > 0")
        check(is_count(self.early_tokens), "early_tokens", "must be an integer >= 1")
        return self


class TokenCounts(NamedTuple):
    """Denominators of the loss: active tokens of each kind in the batch they were counted on."""

    mle_tokens: jax.Array  # int32 scalar
    rto_tokens: jax.Array  # int32 scalar: KEPT RTO positions


def check_batch(batch: Mapping[str, jax.Array]) -> None:
    """Fail at trace time, naming the key, if the batch breaks the [B, T] contract."""
    missing = [k for k in LOSS_BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}; the loss needs {list(LOSS_BATCH_KEYS)} "
                       "(DESIGN.md, Batch contract)")
    shape = tuple(batch["targets"].shape)
    if len(shape) != 2:
        raise ValueError(f"batch['targets'] must be [B, T], got shape {shape}")
    for key in LOSS_BATCH_KEYS[1:]:
        if tuple(batch[key].shape) != shape:
            raise ValueError(f"batch['{key}'] has shape {tuple(batch[key].shape)}, "
                             f"expected {shape} like batch['targets']")


def active_masks(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(mle, rto) boolean [B, T]: supervised positions with a next-token target, and with the
    refusal target. An RTO flag outside loss_mask is not supervised (loss_mask wins)."""
    supervised = batch["loss_mask"].astype(bool)
    rto = batch["rto_mask"].astype(bool) & supervised
    return supervised & ~rto, rto


# --- Which RTO positions are trained this step -------------------------------------------


def keep_counts_table(max_n: int, keep_rate: float) -> np.ndarray:
    """table[n] = RTO positions kept in a row that has n: max(1, ceil(n * keep_rate)), 0 for n = 0.

    Computed exactly on the decimal value of the rate: in floats 100 * 0.07 = 7.000000000000001,
    whose ceiling would keep 8 positions instead of 7."""
    rate = fractions.Fraction(repr(float(keep_rate)))
    return np.array([0] + [max(1, math.ceil(n * rate)) for n in range(1, max_n + 1)], np.int32)


def rank_within_segment(member: jax.Array, segment_ids: jax.Array, order: jax.Array):
    """For every `member` position: (its 0-based rank among the member positions of its own
    segment, ranked by `order` then by position; the number of member positions in that
    segment). Values at non-member positions are meaningless.

    Vectorised for packed rows: one sort by (segment, order) groups each segment's members
    into a contiguous run, running max/min of run boundaries give each run's start and end,
    and a second sort by original index puts the results back in place."""
    batch, length = member.shape
    segment_key = jnp.where(member, segment_ids.astype(jnp.int32), jnp.iinfo(jnp.int32).max)
    index = lax.broadcasted_iota(jnp.int32, (batch, length), 1)
    sorted_segment, _, origin = lax.sort((segment_key, order, index), dimension=1, num_keys=2)
    boundary = sorted_segment[:, 1:] != sorted_segment[:, :-1]
    edge = jnp.ones((batch, 1), bool)
    run_start = lax.cummax(jnp.where(jnp.concatenate([edge, boundary], 1), index, 0), axis=1)
    run_end = lax.cummin(jnp.where(jnp.concatenate([boundary, edge], 1), index, length),
                         axis=1, reverse=True)
    _, rank, count = lax.sort((origin, index - run_start, run_end - run_start + 1),
                              dimension=1, num_keys=1)
    return rank, count


def _keep_first_in_order(rto: jax.Array, segment_ids: jax.Array, order: jax.Array,
                         keep_rate: float) -> jax.Array:
    rank, count = rank_within_segment(rto, segment_ids, order)
    quota = jnp.asarray(keep_counts_table(rto.shape[1], keep_rate))[count]
    return rto & (rank < quota)


def rto_keep_mask(rto_mask: jax.Array, segment_ids: jax.Array, rng: Optional[jax.Array],
                  keep_rate: float) -> jax.Array:
    """Bool [B, T]: a uniformly random max(1, ceil(n * keep_rate)) of the n RTO positions of each
    segment (packed row), fresh for each key. keep_rate = 1.0 returns rto_mask itself.

    The count is taken over the row's RTO positions, not over the padded row as in the
    reference code (which keeps a random number, possibly zero)."""
    rto = rto_mask.astype(bool)
    if keep_rate == 1.0:
        return rto
    if rng is None:
        raise ValueError(f"loss.rto_keep_rate={keep_rate!r} < 1 needs an rng key, got None")
    random_order = jax.random.bits(rng, rto.shape, jnp.uint32)
    return _keep_first_in_order(rto, segment_ids, random_order, keep_rate)


def token_counts(batch: Mapping[str, jax.Array], cfg: LossConfig) -> TokenCounts:
    """MLE tokens and KEPT RTO tokens of `batch`, with no key: the kept count per segment is
    max(1, ceil(n * rate)) whichever positions the key picks. The trainer calls this on the
    global batch before its micro-batch scan and passes the result to every micro-batch."""
    check_batch(batch)
    mle, rto = active_masks(batch)
    if cfg.rto_keep_rate != 1.0:
        by_position = lax.broadcasted_iota(jnp.int32, rto.shape, 1)
        rto = _keep_first_in_order(rto, batch["segment_ids"], by_position, cfg.rto_keep_rate)
    return TokenCounts(mle.sum(dtype=jnp.int32), rto.sum(dtype=jnp.int32))


def position_weights(batch: Mapping[str, jax.Array], keep_mask: jax.Array, cfg: LossConfig,
                     counts: TokenCounts) -> jax.Array:
    """Float32 [B, T] weights with loss = sum(weights * nll); `counts` are GLOBAL denominators."""
    mle, rto = active_masks(batch)
    mle, kept = mle.astype(F32), (keep_mask & rto).astype(F32)
    n_mle, n_rto = counts.mle_tokens.astype(F32), counts.rto_tokens.astype(F32)
    if cfg.normalization == "pooled":
        return (cfg.lambda_mle * mle + cfg.lambda_rto * kept) / jnp.maximum(n_mle + n_rto, 1.0)
    return (cfg.lambda_mle * mle / jnp.maximum(n_mle, 1.0)
            + cfg.lambda_rto * kept / jnp.maximum(n_rto, 1.0))


# --- Negative log-likelihood of the targets -------------------------------------------------


def nll_from_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target], float32 [B, T]: the plain path, for eval and tests."""
    logits = logits.astype(F32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def _chunk_logits(hidden: jax.Array, unembedding: jax.Array) -> jax.Array:
    # Inputs in the compute dtype, logits accumulated and kept in float32 (bf16 logits would
    # round to 1/8 at |logit| ~ 16); only one chunk's [B, C, V] exists at a time.
    return jnp.einsum("bcd,dv->bcv", hidden, unembedding, preferred_element_type=F32)


def _nll_forward(hidden_chunks, unembedding, target_chunks):
    def one_chunk(chunk):
        hidden, targets = chunk
        logits = _chunk_logits(hidden, unembedding)
        logsumexp = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return logsumexp, logsumexp - target_logit

    logsumexp, nll = lax.map(one_chunk, (hidden_chunks, target_chunks))
    return nll, (hidden_chunks, unembedding, target_chunks, logsumexp)


def _nll_backward(residuals, nll_cotangent):
    """d nll / d logits = softmax - onehot(target), recomputed one chunk at a time; the
    unembedding gradient accumulates over chunks in float32."""
    hidden_chunks, unembedding, target_chunks, logsumexp = residuals
    vocab = unembedding.shape[1]

    def one_chunk(d_unembedding, chunk):
        hidden, targets, chunk_logsumexp, cotangent = chunk
        probs = jnp.exp(_chunk_logits(hidden, unembedding) - chunk_logsumexp[..., None])
        d_logits = (probs - jax.nn.one_hot(targets, vocab, dtype=F32)) * cotangent[..., None]
        # Unweighted positions (padding) contribute exactly zero, even if their hidden is NaN.
        weighted = cotangent[..., None] != 0
        d_logits = jnp.where(weighted, d_logits, 0).astype(unembedding.dtype)
        hidden = jnp.where(weighted, hidden, 0)
        d_hidden = jnp.einsum("bcv,dv->bcd", d_logits, unembedding, preferred_element_type=F32)
        d_unembedding += jnp.einsum("bcd,bcv->dv", hidden, d_logits, preferred_element_type=F32)
        return d_unembedding, d_hidden.astype(hidden.dtype)

    d_unembedding, d_hidden = lax.scan(
        one_chunk, jnp.zeros(unembedding.shape, F32),
        (hidden_chunks, target_chunks, logsumexp, nll_cotangent))
    return d_hidden, d_unembedding.astype(unembedding.dtype), None


@jax.custom_vjp
def _nll_over_chunks(hidden_chunks, unembedding, target_chunks):
    return _nll_forward(hidden_chunks, unembedding, target_chunks)[0]


_nll_over_chunks.defvjp(_nll_forward, _nll_backward)


def chunked_nll(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array,
                chunk_size: int) -> jax.Array:
    """-log P(targets), float32 [B, T], from hidden [B, T, D] and unembedding [D, V], scanning
    over sequence chunks of `chunk_size` (the last one zero-padded when it does not divide T)
    so that forward and backward hold one chunk's [B, chunk, V] logits at a time."""
    if hidden.ndim != 3 or unembedding.ndim != 2 or hidden.shape[2] != unembedding.shape[0]:
        raise ValueError(f"chunked_nll: hidden {hidden.shape} must be [B, T, D] and unembedding "
                         f"{unembedding.shape} must be [D, V] with the same D")
    if hidden.dtype != unembedding.dtype:
        raise ValueError(f"chunked_nll: hidden dtype {hidden.dtype} != unembedding dtype "
                         f"{unembedding.dtype}; cast both to the compute dtype")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"chunked_nll: targets {targets.shape} must be {hidden.shape[:2]}")
    batch, length, width = hidden.shape
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad)))
    hidden_chunks = hidden.reshape(batch, num_chunks, chunk, width).transpose(1, 0, 2, 3)
    target_chunks = targets.reshape(batch, num_chunks, chunk).transpose(1, 0, 2)
    nll = _nll_over_chunks(hidden_chunks, unembedding, target_chunks)
    return nll.transpose(1, 0, 2).reshape(batch, num_chunks * chunk)[:, :length]


# --- The loss and its metrics ---------------------------------------------------------------


def metric_sums(nll: jax.Array, batch: Mapping[str, jax.Array], keep_mask: jax.Array,
                cfg: LossConfig) -> dict[str, jax.Array]:
    """Numerators and denominators that add up exactly across micro-batches and devices.

    P(refusal) is measured on ALL RTO positions (kept or not); bucket b of the probe holds the
    RTO positions whose relative index i of n in their row satisfies floor(i * buckets / n) = b
    (bucket 0 = the last prompt token, the last bucket = deep into the harmful answer)."""
    mle, rto = active_masks(batch)
    kept = keep_mask & rto
    p_refusal = jnp.where(rto, jnp.exp(-nll), 0.0)  # on RTO positions the target is the refusal id
    by_position = lax.broadcasted_iota(jnp.int32, rto.shape, 1)
    rank, count = rank_within_segment(rto, batch["segment_ids"], by_position)
    bucket = rank * cfg.num_position_buckets // jnp.maximum(count, 1)
    in_bucket = jax.nn.one_hot(bucket, cfg.num_position_buckets, dtype=F32) * rto[..., None]
    return {
        "mle_nll_sum": jnp.sum(jnp.where(mle, nll, 0.0)),
        "mle_tokens": mle.sum(dtype=jnp.int32),
        "rto_nll_sum": jnp.sum(jnp.where(kept, nll, 0.0)),
        "rto_tokens": kept.sum(dtype=jnp.int32),
        "rto_tokens_total": rto.sum(dtype=jnp.int32),
        "p_refusal_sum": jnp.sum(p_refusal),
        "p_refusal_bucket_sum": jnp.einsum("bt,btk->k", p_refusal, in_bucket),
        "rto_bucket_tokens": in_bucket.sum(axis=(0, 1)).astype(jnp.int32),
    }


def finalize_metrics(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Means from (aggregated) `metric_sums`; a mean over zero tokens is NaN, not a fake 0."""
    def mean(numerator, denominator):
        return jnp.where(denominator > 0, numerator / jnp.maximum(denominator, 1), jnp.nan)

    metrics = {
        "mle_loss": mean(sums["mle_nll_sum"], sums["mle_tokens"]),
        "rto_loss": mean(sums["rto_nll_sum"], sums["rto_tokens"]),
        "p_refusal": mean(sums["p_refusal_sum"], sums["rto_tokens_total"]),
        "mle_tokens": sums["mle_tokens"],
        "rto_tokens": sums["rto_tokens"],
        "rto_tokens_total": sums["rto_tokens_total"],
    }
    by_bucket = mean(sums["p_refusal_bucket_sum"], sums["rto_bucket_tokens"])
    for b in range(by_bucket.shape[0]):
        metrics[f"p_refusal_bucket_{b}"] = by_bucket[b]
    return metrics


def loss_from_nll(nll: jax.Array, batch: Mapping[str, jax.Array], rng: Optional[jax.Array],
                  cfg: LossConfig, global_counts: Optional[TokenCounts] = None,
                  per_position: Optional[jax.Array] = None):
    """(loss, metric sums) from per-position nll [B, T]. Without `global_counts` the batch is
    its own global batch; under gradient accumulation pass `token_counts(global_batch, cfg)`
    and the per-micro-batch losses (and gradients) add up to the global-batch loss.

    `per_position` [B, T], when given, is the term that is weighted instead of `nll` (another
    objective on the same positions and denominators); the metrics still report the nll."""
    cfg.validate()
    check_batch(batch)
    _, rto = active_masks(batch)
    keep_mask = rto_keep_mask(rto, batch["segment_ids"], rng, cfg.rto_keep_rate)
    counts = token_counts(batch, cfg) if global_counts is None else global_counts
    weights = position_weights(batch, keep_mask, cfg, counts)
    term = nll if per_position is None else per_position
    loss = jnp.sum(jnp.where(weights != 0, weights * term, 0.0))
    return loss, metric_sums(nll, batch, keep_mask, cfg)


def derta_loss(hidden: jax.Array, unembedding: jax.Array, batch: Mapping[str, jax.Array],
               rng: Optional[jax.Array], cfg: LossConfig,
               global_counts: Optional[TokenCounts] = None):
    """The training loss from final hidden states [B, T, D] and unembedding [D, V] (chunked)."""
    cfg.validate()
    check_batch(batch)
    nll = chunked_nll(hidden, unembedding, batch["targets"], cfg.chunk_size)
    return loss_from_nll(nll, batch, rng, cfg, global_counts)


def derta_loss_from_logits(logits: jax.Array, batch: Mapping[str, jax.Array],
                           rng: Optional[jax.Array], cfg: LossConfig,
                           global_counts: Optional[TokenCounts] = None):
    """The same loss from full logits [B, T, V] (eval, tests, small vocabularies)."""
    check_batch(batch)
    return loss_from_nll(nll_from_logits(logits, batch["targets"]), batch, rng, cfg, global_counts)
