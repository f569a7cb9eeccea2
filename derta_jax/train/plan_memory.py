"""Per-device memory, batch split and communication of a training run, from shapes alone.

Why: a 70B run should be priced before a pod is rented. Everything here works on
`nnx.eval_shape` structures and the trainer's own sharding rules (mesh.state_shardings /
logical_to_spec) on a `jax.sharding.AbstractMesh`, so any mesh size can be planned on a
laptop without devices and without allocating the model. The compiled figures
(plan_compile) replace the activation estimate below whenever a compile is run.

Conventions: byte counts are PER DEVICE unless named `_total`; GiB = 2**30 bytes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding

from derta_jax.models.config import ModelConfig
from derta_jax.models import sharding as sharding_lib
from derta_jax.train.config import MESH_AXES

GIB = 2.0**30


def abstract_mesh(mesh_sizes: Mapping[str, int]) -> AbstractMesh:
    sizes = tuple(int(mesh_sizes[a]) for a in MESH_AXES)
    return AbstractMesh(sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))


def per_device_bytes(shape, dtype, sharding: NamedSharding) -> int:
    return math.prod(sharding.shard_shape(tuple(shape))) * jnp.dtype(dtype).itemsize


def params_per_device(params: nnx.State, mesh) -> tuple[int, int, int]:
    """(parameter count, total bytes, bytes per device) under the trainer's rules."""
    shardings = jax.tree.leaves(nnx.to_pure_dict(sharding_lib.state_shardings(params, mesh)))
    leaves = jax.tree.leaves(nnx.to_pure_dict(params))
    count = sum(math.prod(a.shape) for a in leaves)
    total = sum(math.prod(a.shape) * a.dtype.itemsize for a in leaves)
    device = sum(per_device_bytes(a.shape, a.dtype, s) for a, s in zip(leaves, shardings))
    return count, total, device


# --- the state of a run -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StateMemory:
    param_count: int  # every parameter of the model (frozen base included)
    trained_count: int  # parameters with gradients and optimiser state
    params_bytes: int  # per device: all parameters (base + adapters)
    grads_bytes: int  # per device: the accumulator plus one micro-batch's gradients (trained)
    opt_bytes: int  # per device: Adam mu + nu (+ the step count)
    trained_bytes_total: int  # one copy of the trained parameters, unsharded
    params_bytes_total: int

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.opt_bytes


def abstract_parts(config: ml_collections.ConfigDict, model_cfg: ModelConfig):
    """(graphdef, trained params, frozen base params or None, rest) as the trainer splits them:
    full fine-tuning trains every nnx.Param; LoRA (derta_jax.models.lora) trains the
    adapters (nnx.LoRAParam) and freezes the base."""
    from derta_jax import weights
    from derta_jax.models import lora

    settings = lora.LoraSettings.from_config(config.lora) if config.lora.enabled else None
    return weights.abstract_parts(model_cfg, config.seed, settings)


def opt_state_per_device(config: ml_collections.ConfigDict, trained: nnx.State, mesh) -> int:
    """Bytes per device of the trainer's optimiser state for `trained`, on its shardings."""
    from derta_jax.train.optimizer import make_optimizer
    from derta_jax.train.state import opt_state_shardings

    optimizer = make_optimizer(config.optim, 1000)
    pure = nnx.to_pure_dict(trained)
    shardings = nnx.to_pure_dict(sharding_lib.state_shardings(trained, mesh))
    abstract = jax.eval_shape(optimizer.init, pure)
    opt_shardings = opt_state_shardings(optimizer, pure, shardings, mesh)
    return sum(per_device_bytes(a.shape, a.dtype, s) for a, s in
               zip(jax.tree.leaves(abstract), jax.tree.leaves(opt_shardings)))


def state_memory(config: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh) -> StateMemory:
    """Bytes per device of parameters, gradients and optimiser state on `mesh`."""
    _, trained, frozen, _ = abstract_parts(config, model_cfg)
    n_trained, trained_total, trained_dev = params_per_device(trained, mesh)
    n_frozen, frozen_total, frozen_dev = (params_per_device(frozen, mesh) if frozen is not None
                                          else (0, 0, 0))
    if frozen is None and config.loss.get("objective") == "constrained_sft":
        # full fine-tuning against a frozen copy of the starting weights (its parameters
        # are the same ones, so param_count does not change)
        frozen_total, frozen_dev, n_frozen = trained_total, trained_dev, 0
    return StateMemory(n_trained + n_frozen, n_trained, trained_dev + frozen_dev, 2 * trained_dev,
                       opt_state_per_device(config, trained, mesh), trained_total,
                       trained_total + frozen_total)


# --- batch split, activations, communication ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BatchSplit:
    global_batch: int
    micro_batches: int
    batch_devices: int  # data x fsdp: devices a micro-batch is split over
    seqs_per_device: int  # sequences per device per micro-batch
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def batch_split(config: ml_collections.ConfigDict, mesh_sizes: Mapping[str, int]) -> BatchSplit:
    t = config.train
    devices = mesh_sizes["data"] * mesh_sizes["fsdp"]
    micro = t.batch_size // t.micro_batches
    return BatchSplit(t.batch_size, t.micro_batches, devices, micro // devices,
                      config.data.max_length)


BATCH_BYTES_PER_TOKEN = 4 * 4 + 2 * 1  # four int32 arrays and two bool masks (Batch contract)


def batch_bytes_per_device(split: BatchSplit) -> int:
    """The global batch arrays as the step receives them, sharded over data x fsdp."""
    return BATCH_BYTES_PER_TOKEN * split.global_batch * split.seq_len // split.batch_devices


def activation_bytes_estimate(cfg: ModelConfig, seqs: int, seq_len: int, chunk: int,
                              tensor: int = 1) -> int:
    """A rough per-device activation figure, used only when no compile is run.

    Full remat: the scan saves each layer's input [b, T, D]; the backward of one layer
    recomputes its forward (q, k, v, attention probabilities in f32, the MLP's three
    [b, T, F] tensors, f32 norms) and needs about as much again for its gradients; the
    chunked loss holds [b, chunk, V] f32 logits and their gradient. Without remat every
    layer's working set is kept."""
    s = jnp.dtype(cfg.dtype).itemsize
    b, d = seqs, cfg.hidden_size
    heads, kv = cfg.num_heads / tensor, cfg.num_kv_heads / tensor
    mlp = (cfg.num_experts_per_tok if cfg.is_moe else 1) * cfg.intermediate_size / tensor
    layer = (b * seq_len * ((2 * heads + 2 * kv) * cfg.head_dim * s + 3 * mlp * s + 2 * 4 * d)
             + 2 * b * heads * seq_len * seq_len * 4)
    saved = cfg.num_layers * b * seq_len * d * s
    loss = 2 * b * min(chunk, seq_len) * cfg.vocab_size * 4 + b * seq_len * d * 4
    kept = 2 * layer if cfg.remat_policy != "none" else cfg.num_layers * layer + layer
    return int(saved + kept + loss)


@dataclasses.dataclass(frozen=True)
class CommVolume:
    """Bytes each device sends per optimiser step (ring collectives move (n-1)/n of the
    gathered size per device)."""

    fsdp_all_gather: int  # 2 gathers (forward + remat/backward) per micro-batch
    fsdp_reduce_scatter: int  # trained gradients, once per micro-batch
    data_all_reduce: int  # fsdp-sharded gradients across data replicas, once per step

    @property
    def total(self) -> int:
        return self.fsdp_all_gather + self.fsdp_reduce_scatter + self.data_all_reduce


def comm_volume(state: StateMemory, mesh_sizes: Mapping[str, int], micro_batches: int) -> CommVolume:
    """V = M * (2 W + G) * (n-1)/n + 2 * (G/n) * (d-1)/d per device, with n = fsdp size,
    d = data size, M micro-batches, W = the parameter bytes one fsdp group holds (per-device
    params x n, in their stored dtype: an upper bound when XLA gathers after the bf16 cast)
    and G = the trained gradients' bytes in that group. Tensor/expert collectives are not
    counted."""
    n, d = mesh_sizes["fsdp"], mesh_sizes["data"]
    ring = (n - 1) / n
    weights = state.params_bytes * n
    grad_shard = state.grads_bytes // 2  # one copy of the trained gradients
    grads = grad_shard * n
    return CommVolume(int(micro_batches * 2 * weights * ring),
                      int(micro_batches * grads * ring),
                      int(2 * grad_shard * (d - 1) / d))
