"""The training state and the jitted step for a config on a mesh, assembled once.

Why: the trainer runs this step, the planner compiles it ahead of time, the benchmarks
time it and the tests check it. If each assembled its own (optimiser, shardings, donation,
batch constraint, LoRA split), the planner would price a step the trainer never runs.
`assemble` is the one place:

    a = assemble(config, mesh, total_steps)
    state = a.init_state()                       # or a.restore_state(manager, step)
    frozen = a.load_frozen()                     # the LoRA base (None-shaped otherwise)
    state, metrics = a.step(state, frozen, batch)
    compiled = a.lower(*a.abstract_inputs()).compile()   # the planner: nothing allocated

Where the weights come from (derta_jax.weights): `model.init_from` (a derta_jax workdir or
checkpoint: a `convert` output or a training run, local or gs://; each process restores
only its own shards), else `model.hf_dir` (streamed from safetensors), else the seed. With
LoRA those are the frozen base's weights, and the adapters start from the seed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from derta_jax import weights
from derta_jax import workdir as wd
from derta_jax.models import lora
from derta_jax.models.config import ModelConfig
from derta_jax.models import sharding as sharding_lib
from derta_jax.train.config import build_model_config, loss_config
from derta_jax.train.optimizer import learning_rate_schedule, make_optimizer
from derta_jax.train.step import BATCH_KEYS, LossFunction, TrainState, loss_function, make_train_step
from derta_jax.xla_flags import step_compiler_options

BATCH_DTYPES = {"input_ids": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.bool_,
                "rto_mask": jnp.bool_, "positions": jnp.int32, "segment_ids": jnp.int32}


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_pure: Any,
                        param_shardings: Any, mesh) -> Any:
    """Shardings of `optimizer`'s state: moments shard like their parameters, scalars
    (step counts) are replicated. `abstract_pure`: the trained params as a pure dict."""
    rep = sharding_lib.replicated(mesh)
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding,
                                 jax.eval_shape(optimizer.init, abstract_pure), param_shardings,
                                 transform_non_params=lambda _: rep)


@dataclasses.dataclass
class Assembly:
    """Everything the trainer, the planner and the benchmarks share about one run's step."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    model_cfg: ModelConfig
    lora_settings: Optional[lora.LoraSettings]
    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_params: Any  # pure dict of the trained params (ShapeDtypeStructs)
    abstract_frozen: Any  # pure dict of the frozen base (LoRA) or of the non-Param rest
    state_shardings: TrainState
    frozen_shardings: Any  # None for full fine-tuning
    batch_sharding: NamedSharding
    jitted: Any  # jax.jit of the pure step, state donated

    def step(self, state: TrainState, frozen: Any, batch: dict):
        """One optimiser step, traced under the mesh (MoE dispatch per shard)."""
        with jax.set_mesh(self.mesh):
            return self.jitted(state, frozen, batch)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)

    # -- abstract inputs (the planner) ------------------------------------------------------
    def abstract_state(self) -> TrainState:
        s = self.state_shardings
        key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
        return TrainState(
            jax.ShapeDtypeStruct((), jnp.int32, sharding=s.step),
            weights.with_shardings(self.abstract_params, s.params),
            weights.with_shardings(jax.eval_shape(self.optimizer.init, self.abstract_params),
                                   s.opt_state),
            jax.ShapeDtypeStruct((), key_dtype, sharding=s.rng))

    def abstract_batch(self) -> dict:
        shape = (self.config.train.batch_size, self.config.data.max_length)
        return {k: jax.ShapeDtypeStruct(shape, BATCH_DTYPES[k], sharding=self.batch_sharding)
                for k in BATCH_KEYS}

    def abstract_inputs(self) -> tuple:
        frozen = (self.abstract_frozen if self.frozen_shardings is None
                  else weights.with_shardings(self.abstract_frozen, self.frozen_shardings))
        return self.abstract_state(), frozen, self.abstract_batch()

    # -- values (the trainer) ---------------------------------------------------------------
    def init_state(self, params: Any = None) -> TrainState:
        """Step 0: the trained parameters (`params` when given, else from init_from / hf_dir /
        the seed; LoRA: adapters from the seed) on their shardings; a fresh optimiser state."""
        cfg, seed = self.model_cfg, self.config.seed
        shardings = self.state_shardings.params
        if params is not None:
            params = jax.device_put(params, shardings)
        elif self.lora_settings is not None:
            params = weights.init_adapters(cfg, self.lora_settings, seed, shardings)
        else:
            params = load_base_params(self.config, cfg, shardings)
        opt_state = jax.jit(self.optimizer.init, out_shardings=self.state_shardings.opt_state)(params)
        return self._placed(0, params, opt_state, jax.random.key(seed))

    def _placed(self, step: int, params: Any, opt_state: Any, rng: jax.Array) -> TrainState:
        """A TrainState whose step counter and key sit on their (replicated) shardings, as
        the step returns them: the second call then reuses the first call's trace and
        executable instead of tracing and compiling the step again. Made by a jitted
        function of constants, as device_put cannot place onto another process's devices."""
        s = self.state_shardings
        key_data, impl = np.asarray(jax.random.key_data(rng)), jax.random.key_impl(rng)
        step_array, key = jax.jit(
            lambda: (jnp.asarray(step, jnp.int32), jax.random.wrap_key_data(jnp.asarray(key_data), impl=impl)),
            out_shardings=(s.step, s.rng))()
        return TrainState(step_array, params, opt_state, key)

    def load_frozen(self) -> Any:
        """The frozen base of a LoRA run, reloaded at every start (checkpoints hold only the
        adapters); for full fine-tuning against the aligned model (loss.objective=
        constrained_sft), the rest and a copy of the starting weights; the (empty) non-Param
        rest of the model otherwise."""
        if self.frozen_shardings is None:
            return self.abstract_frozen
        if self.lora_settings is None:
            return {"rest": self.abstract_frozen["rest"],
                    "aligned": load_base_params(self.config, self.model_cfg,
                                                self.frozen_shardings["aligned"])}
        return load_base_params(self.config, self.model_cfg, self.frozen_shardings)

    def restore_state(self, manager, step: int) -> tuple[TrainState, dict]:
        """Training step `step` of a workdir onto this run's shardings -> (state, loader state)."""
        s = self.state_shardings
        abstract = self.abstract_state()
        restored = wd.restore_training_state(manager, step, abstract.params, abstract.opt_state,
                                             jax.random.key(self.config.seed), s.step)
        state = self._placed(restored["step"], restored["params"], restored["opt_state"],
                             restored["rng"])
        return state, restored["data"]


def load_base_params(config: ml_collections.ConfigDict, cfg: ModelConfig, shardings: Any) -> dict:
    """The plain model's weights a run starts from: model.init_from, else model.hf_dir,
    else initialised from the seed; placed on `shardings`."""
    m = config.model
    if m.init_from:
        source, step = wd.split_checkpoint_path(m.init_from)
        params, _ = weights.restore_full_params(source, cfg, step, shardings)
        return params
    if m.hf_dir:
        return weights.load_hf_params(m.hf_dir, cfg, shardings)
    return weights.init_params(cfg, config.seed, shardings)


def base_record(config: ml_collections.ConfigDict, cfg: ModelConfig) -> dict:
    """lora.json's `base`: where this LoRA run's frozen base comes from, with its hash."""
    from derta_jax import paths

    m = config.model
    if m.init_from:
        source, step = wd.split_checkpoint_path(m.init_from)
        base = {"workdir": str(paths.resolve(source)),
                "step": step if step is not None else wd.latest_step(source)}
    elif m.hf_dir:
        base = {"hf_dir": str(paths.resolve(m.hf_dir))}
    else:
        base = {"init_seed": int(config.seed)}
    return {**base, "model_config_sha256": wd.model_config_hash(cfg)}


def parts_of_frozen(lora_run: bool, needs_aligned: bool):
    """(model_parts, aligned_parts) for make_train_step: how the step's (params, frozen) make
    the trained model and, for a loss that needs it, the frozen aligned model. LoRA: the
    aligned model is the frozen base with the adapters at zero (no second copy of the
    weights); full fine-tuning: frozen = {"rest", "aligned": a copy of the start weights}."""
    if not needs_aligned:
        return (lambda params, frozen: (params, frozen)), None
    if lora_run:
        return ((lambda params, frozen: (params, frozen)),
                lambda params, frozen: (jax.tree.map(jnp.zeros_like, params), frozen))
    return ((lambda params, frozen: (params, frozen["rest"])),
            lambda params, frozen: (frozen["aligned"], frozen["rest"]))


def assemble(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, total_steps: int,
             model_cfg: Optional[ModelConfig] = None,
             loss_fn: Optional[LossFunction] = None) -> Assembly:
    """The step and the state's shapes and shardings for `config` on `mesh`.

    `loss_fn` (default: the DeRTa loss of config.loss) is any derta_jax.train.step
    LossFunction: the step, the optimiser and the shardings stay the same."""
    model_cfg = model_cfg or build_model_config(config)
    settings = lora.LoraSettings.from_config(config.lora) if config.lora.enabled else None
    graphdef, trained, frozen_base, rest = weights.abstract_parts(model_cfg, config.seed, settings)
    param_shardings = nnx.to_pure_dict(sharding_lib.state_shardings(trained, mesh))
    abstract_params = nnx.to_pure_dict(trained)
    optimizer = make_optimizer(config.optim, total_steps)
    rep = sharding_lib.replicated(mesh)
    state_shardings = TrainState(rep, param_shardings, opt_state_shardings(
        optimizer, abstract_params, param_shardings, mesh), rep)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    loss_fn = loss_fn or loss_function(loss_config(config))
    model_parts, aligned_parts = parts_of_frozen(settings is not None, loss_fn.needs_aligned)
    if frozen_base is not None:
        frozen_shardings = nnx.to_pure_dict(sharding_lib.state_shardings(frozen_base, mesh))
        abstract_frozen = nnx.to_pure_dict(frozen_base)
    elif loss_fn.needs_aligned:  # full fine-tuning against a frozen copy of the start
        rest = nnx.to_pure_dict(rest)
        abstract_frozen = {"rest": rest, "aligned": abstract_params}
        frozen_shardings = {"rest": jax.tree.map(lambda _: rep, rest), "aligned": param_shardings}
    else:
        frozen_shardings, abstract_frozen = None, nnx.to_pure_dict(rest)
    micro_spec = NamedSharding(mesh, PartitionSpec(*batch_sharding.spec))

    def constrain(micro_batch: dict) -> dict:
        return {k: jax.lax.with_sharding_constraint(v, micro_spec) for k, v in micro_batch.items()}

    prepare: Optional[Callable] = None
    if settings is not None and settings.dropout > 0:
        prepare = lora.set_dropout_keys
    step_fn = make_train_step(graphdef, optimizer, config.train.micro_batches,
                              loss_fn=loss_fn, aux_loss_coef=model_cfg.router_aux_loss_coef,
                              micro_batch_constraint=constrain, prepare_model=prepare,
                              model_parts=model_parts, aligned_parts=aligned_parts)
    platform = mesh.devices.flat[0].platform
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, frozen_shardings,
                                            {k: batch_sharding for k in BATCH_KEYS}),
                     out_shardings=(state_shardings, None), donate_argnums=(0,),
                     compiler_options=step_compiler_options(platform) or None)
    return Assembly(config, mesh, model_cfg, settings, graphdef, optimizer,
                    learning_rate_schedule(config.optim, total_steps), abstract_params,
                    abstract_frozen, state_shardings, frozen_shardings, batch_sharding, jitted)
