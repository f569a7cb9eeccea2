"""One pure training step: `train_step(state, frozen, batch) -> (state, metrics)`.

Built by derta_jax.train.state.assemble for every user (trainer, planner, benchmarks); the
loss is a pluggable `LossFunction`, the DeRTa loss by default (`loss.objective`). A loss that
needs the frozen aligned model's log-probabilities (constrained_sft) gets that model's hidden
states from a second, gradient-free forward pass on the same micro-batch.

The global batch [G, T] is split into `micro_batches` slices that a `lax.scan` walks through,
adding gradients. The loss is normalised over the WHOLE global batch: `token_counts` of the
global batch (cheap, no forward pass) are handed to every micro-batch, whose loss is
sum(weights * nll) with those global denominators, so the accumulated gradient equals the
gradient of the global-batch loss (sum/sum), never a mean of per-micro-batch means. Under
jit with a sharded batch, the sums over devices are XLA's job.

`state.params` holds only the TRAINED parameters (all of them for full fine-tuning, the
LoRA adapters for LoRA); `frozen` holds the rest (the frozen base), so the optimiser state
exists for trained parameters only. `prepare_model(model, key)`, when given, runs on the
merged model before each micro-batch's forward pass (the LoRA trainer gives its adapters
their dropout keys there, derived from the micro-batch's key so that resume is exact).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from derta_jax import constrained_loss as constrained
from derta_jax import loss as derta

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "rto_mask", "positions", "segment_ids")


class LossFunction(NamedTuple):
    """A loss the step can train with (the step is otherwise loss-agnostic, as Tunix's
    `with_loss_fn`). The metrics contract: `loss` returns (scalar, dict of float32 sums),
    `finalize` turns the sums accumulated over micro-batches into the logged metrics.

    counts(batch) -> denominators, computed ONCE on the global batch
    loss(hidden [B,T,D], unembedding [D,V], micro_batch, rng, counts) -> (loss, sums)
    finalize(sums) -> metrics
    needs_aligned: the loss also takes `aligned=(hidden, unembedding)` of the frozen aligned
      model (the starting weights) on the same micro-batch
    """

    counts: Callable[[dict], Any]
    loss: Callable[..., tuple[jax.Array, dict]]
    finalize: Callable[[dict], dict]
    needs_aligned: bool = False


def derta_loss_function(loss_cfg: derta.LossConfig) -> LossFunction:
    """The default: DeRTa's MLE + RTO loss (derta_jax.loss), normalised over the global batch."""
    def loss(hidden, unembedding, micro_batch, rng, counts):
        return derta.derta_loss(hidden, unembedding, micro_batch, rng, loss_cfg,
                                global_counts=counts)

    return LossFunction(lambda batch: derta.token_counts(batch, loss_cfg), loss,
                        derta.finalize_metrics)


def constrained_loss_function(loss_cfg: derta.LossConfig) -> LossFunction:
    """Qi et al.'s token-wise constrained objective (derta_jax.constrained_loss) on the
    next-token positions, against the frozen aligned model; the same denominators."""
    def loss(hidden, unembedding, micro_batch, rng, counts, aligned):
        return constrained.constrained_loss(hidden, unembedding, *aligned, micro_batch, rng,
                                            loss_cfg, global_counts=counts)

    return LossFunction(lambda batch: derta.token_counts(batch, loss_cfg), loss,
                        constrained.finalize_metrics, needs_aligned=True)


def loss_function(loss_cfg: derta.LossConfig) -> LossFunction:
    """The LossFunction that config.loss.objective names."""
    if loss_cfg.objective == "constrained_sft":
        return constrained_loss_function(loss_cfg)
    return derta_loss_function(loss_cfg)


def _as_given(params: Any, frozen: Any) -> tuple[Any, Any]:
    return params, frozen


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any  # nnx.State of the trained variables
    opt_state: Any
    rng: jax.Array  # base key; the step's key is fold_in(rng, step), so resume is exact


def split_micro_batches(batch: dict, micro_batches: int) -> dict:
    """[G, T] -> [M, G/M, T]. Row r of micro-batch m is global row m * (G/M) + r."""
    def split(x):
        g = x.shape[0]
        return x.reshape(micro_batches, g // micro_batches, *x.shape[1:])

    return {k: split(v) for k, v in batch.items()}


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    micro_batches: int, loss_fn: LossFunction,
                    aux_loss_coef: float = 0.0,
                    micro_batch_constraint: Callable[[dict], dict] = lambda b: b,
                    prepare_model: Optional[Callable[[nnx.Module, jax.Array], Any]] = None,
                    model_parts: Callable[[Any, Any], tuple[Any, Any]] = _as_given,
                    aligned_parts: Optional[Callable[[Any, Any], tuple[Any, Any]]] = None):
    """Builds the pure step. `micro_batch_constraint` re-applies the batch sharding to each
    micro-batch slice (identity without a mesh). `model_parts(params, frozen)` and
    `aligned_parts(params, frozen)` give the (params, rest) that nnx.merge makes the trained
    model and the frozen aligned model of from the step's inputs (a loss that
    `needs_aligned` requires the second)."""
    if loss_fn.needs_aligned and aligned_parts is None:
        raise ValueError("this loss compares against the frozen aligned model, but the step "
                         "was given no aligned_parts to build it from")

    def forward(model, micro_batch):
        return model(micro_batch["input_ids"], micro_batch["positions"],
                     micro_batch["segment_ids"])

    def micro_loss(params, frozen, micro_batch, rng, counts):
        model = nnx.merge(graphdef, *model_parts(params, frozen))
        if prepare_model is not None:
            prepare_model(model, rng)
        hidden, aux = forward(model, micro_batch)
        extra = {}
        if loss_fn.needs_aligned:
            aligned = nnx.merge(graphdef, *jax.lax.stop_gradient(aligned_parts(params, frozen)))
            extra["aligned"] = (forward(aligned, micro_batch)[0], aligned.unembedding())
        loss, sums = loss_fn.loss(hidden, model.unembedding(), micro_batch, rng, counts, **extra)
        if "aux_loss" in aux:
            sums["router_aux_loss_sum"] = aux["aux_loss"].astype(jnp.float32)
            if aux_loss_coef:
                loss = loss + aux_loss_coef * aux["aux_loss"] / micro_batches
        return loss, sums

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state: TrainState, frozen: Any, batch: dict):
        step_rng = jax.random.fold_in(state.rng, state.step)
        counts = loss_fn.counts(batch)
        micro = split_micro_batches({k: batch[k] for k in BATCH_KEYS}, micro_batches)

        def body(carry, xs):
            grads_acc, loss_acc, sums_acc = carry
            index, micro_batch = xs
            micro_batch = micro_batch_constraint(micro_batch)
            rng = jax.random.fold_in(step_rng, index)
            (loss, sums), grads = grad_fn(state.params, frozen, micro_batch, rng, counts)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            sums_acc = jax.tree.map(jnp.add, sums_acc, sums)
            return (grads_acc, loss_acc + loss, sums_acc), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        first = jax.tree.map(lambda x: x[0], micro)
        sums_shape = jax.eval_shape(lambda: grad_fn(state.params, frozen, first, step_rng,
                                                    counts)[0][1])
        zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
        (grads, loss, sums), _ = jax.lax.scan(
            body, (zeros, jnp.zeros((), jnp.float32), zero_sums),
            (jnp.arange(micro_batches), micro))

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = loss_fn.finalize(sums)
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["param_norm"] = optax.tree.norm(params)
        if "router_aux_loss_sum" in sums:
            metrics["router_aux_loss"] = sums["router_aux_loss_sum"] / micro_batches
        new_state = TrainState(state.step + 1, params, opt_state, state.rng)
        return new_state, metrics

    return train_step
