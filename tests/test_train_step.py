"""derta_jax.train.step: M micro-batches are one batch.

The step splits the global batch into `micro_batches` slices, scans over them and adds their
gradients, each micro-batch's loss being normalised by the GLOBAL token counts. So for any M
the step must give what M=1 gives (loss, metrics, updated parameters), and its gradient must
be jax.grad of the DeRTa loss of the whole batch, written here the slow obvious way: full
logits, log-softmax, the negative log-likelihood of `targets` at the supervised positions,
normalised as the paper says (pooled: one mean over MLE and RTO tokens). rto_keep_rate is 1.0:
with a lower rate the kept RTO positions are drawn per micro-batch key, so only their count is
the same for every M.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from derta_jax import loss as derta
from derta_jax.models.presets import get_preset
from derta_jax.models.transformer import Transformer
from derta_jax.train.step import BATCH_KEYS, TrainState, derta_loss_function, make_train_step

VOCAB, ROWS, LENGTH, REFUSAL = 61, 8, 16, 7
LOSS = derta.LossConfig(chunk_size=8)  # pooled, as the paper; two chunks of the chunked loss


def random_batch(seed: int = 0) -> dict:
    """[ROWS, LENGTH] per DESIGN.md's Batch contract: rows of one padded segment or two packed
    ones; a segment is a prompt and a response, supervised from the last prompt token through
    the last response token, with next-token targets (MLE) or the refusal id (RTO)."""
    rng = np.random.default_rng(seed)
    batch = {k: np.zeros((ROWS, LENGTH), np.int32) for k in ("input_ids", "targets", "positions",
                                                             "segment_ids")}
    batch.update(loss_mask=np.zeros((ROWS, LENGTH), bool), rto_mask=np.zeros((ROWS, LENGTH), bool))
    for row in range(ROWS):
        lengths = [int(rng.integers(5, 9))] if row % 3 else [int(rng.integers(4, 8))] * 2
        start = 0
        for segment, length in enumerate(lengths, start=1):
            span = slice(start, start + length)
            tokens = rng.integers(1, VOCAB, size=length)
            batch["input_ids"][row, span] = tokens
            batch["positions"][row, span] = np.arange(length)
            batch["segment_ids"][row, span] = segment
            prompt = int(rng.integers(1, length - 1))
            supervised = np.arange(start + prompt - 1, start + length - 1)
            batch["loss_mask"][row, supervised] = True
            if (row + segment) % 2:  # an RTO segment: every response position says "sorry"
                batch["rto_mask"][row, supervised] = True
                batch["targets"][row, supervised] = REFUSAL
            else:
                batch["targets"][row, supervised] = tokens[supervised - start + 1]
            start += length
    return {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}


def reference_loss(logits: jax.Array, batch: dict, cfg: derta.LossConfig) -> jax.Array:
    """The DeRTa loss from full logits, with nothing of derta_jax.loss."""
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1),
                               batch["targets"][..., None], axis=-1)[..., 0]
    rto = batch["rto_mask"] & batch["loss_mask"]
    mle = batch["loss_mask"] & ~rto
    mle_sum, rto_sum = jnp.sum(jnp.where(mle, nll, 0.0)), jnp.sum(jnp.where(rto, nll, 0.0))
    if cfg.normalization == "pooled":
        return (cfg.lambda_mle * mle_sum + cfg.lambda_rto * rto_sum) / (mle.sum() + rto.sum())
    return cfg.lambda_mle * mle_sum / mle.sum() + cfg.lambda_rto * rto_sum / rto.sum()


@pytest.fixture(scope="module")
def model_parts():
    config = get_preset("tiny", vocab_size=VOCAB)
    graphdef, params, rest = nnx.split(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def run_step(model_parts, loss_cfg, micro_batches, batch):
    """One step with SGD at learning rate 1, so new params = params - gradient exactly."""
    graphdef, params, rest = model_parts
    optimizer = optax.sgd(1.0)
    step = jax.jit(make_train_step(graphdef, optimizer, micro_batches,
                                   derta_loss_function(loss_cfg.validate())))
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                       jax.random.key(0))
    new_state, metrics = step(state, rest, batch)
    gradient = jax.tree.map(lambda old, new: np.asarray(old) - np.asarray(new), params,
                            new_state.params)
    return new_state, {k: np.asarray(v) for k, v in metrics.items()}, gradient


def test_the_random_batch_keeps_the_contract():
    batch = random_batch()
    assert set(batch) == set(BATCH_KEYS)
    assert all(v.shape == (ROWS, LENGTH) for v in batch.values())
    supervised = np.asarray(batch["loss_mask"])
    rto = np.asarray(batch["rto_mask"])
    assert not (rto & ~supervised).any() and rto.any() and (supervised & ~rto).any()
    assert (np.asarray(batch["targets"])[rto] == REFUSAL).all()
    assert (np.asarray(batch["segment_ids"]) == 2).any()  # packed rows
    assert (np.asarray(batch["segment_ids"]) == 0).any()  # padding
    assert not supervised[np.asarray(batch["segment_ids"]) == 0].any()


def test_micro_batches_give_the_whole_batch_step_and_its_gradient(model_parts):
    batch = random_batch(seed=1)
    graphdef, params, rest = model_parts

    def whole_batch_loss(p):
        model = nnx.merge(graphdef, p, rest)
        hidden, _ = model(batch["input_ids"], batch["positions"], batch["segment_ids"])
        logits = model.logits(hidden)
        return reference_loss(logits, batch, LOSS), logits

    (ref_loss, logits), ref_grad = jax.jit(jax.value_and_grad(whole_batch_loss, has_aux=True))(
        params)
    ref_grad = jax.tree.map(np.asarray, ref_grad)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grad))
    assert scale > 1e-3  # the gradient is not zero: comparing to it means something
    # The batch tells the global loss from a naive accumulation (the mean of the micro-batches'
    # own means): its halves hold different numbers of supervised tokens.
    halves = [slice(0, ROWS // 2), slice(ROWS // 2, ROWS)]
    mean_of_means = np.mean([reference_loss(logits[h], {k: v[h] for k, v in batch.items()}, LOSS)
                             for h in halves])
    assert abs(float(ref_loss) - mean_of_means) > 1e-3

    one_state, one_metrics, one_grad = run_step(model_parts, LOSS, 1, batch)
    np.testing.assert_allclose(one_metrics["loss"], ref_loss, rtol=1e-5)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-3,
                                                              atol=1e-4 * scale),
                 one_grad, ref_grad)
    for micro_batches in (2, 4):
        state, metrics, grad = run_step(model_parts, LOSS, micro_batches, batch)
        assert int(state.step) == 1
        assert sorted(metrics) == sorted(one_metrics)
        for key, value in metrics.items():
            np.testing.assert_allclose(value, one_metrics[key], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{key} with micro_batches={micro_batches}")
        jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5,
                                                                  atol=1e-6),
                     state.params, one_state.params)
        jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-3,
                                                                  atol=1e-4 * scale),
                     grad, ref_grad)
