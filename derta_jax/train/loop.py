"""`run(config)`: the whole training run, top to bottom.

  1. config -> validated; distributed runtime up; workdir with the resolved config
  2. tokenizer + rows -> token cache -> this process's batches (derta_jax.train.data)
  3. mesh + logical rules -> parameter shardings; parameters initialised (or loaded from an
     HF directory) straight onto them. With LoRA (config.lora.enabled; derta_jax.train.lora)
     the trained parameters are the adapters only; the frozen base is loaded from
     model.hf_dir (or initialised from the seed) at every start, never checkpointed
  4. resume from the latest complete checkpoint in the workdir, if any
  5. the jitted step over the batches; metrics every log_every steps; async checkpoints
  6. final checkpoint, loss-curve PNG, one-screen summary

The workdir may be local or a URI (gs://bucket/run): every path in it goes through
etils.epath (derta_jax.hf.workdir.resolve); Orbax writes checkpoints there directly.

Preemption: SIGTERM (and SIGINT) set a flag; the loop saves a checkpoint at the next step
boundary and exits (multi-process: at the next logging step, agreed by all processes;
derta_jax.train.preemption). SIGKILL loses only the steps after the last complete checkpoint.
A non-finite loss stops the run before anything non-finite is saved.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from derta_jax import loss as derta
from derta_jax.hf import workdir as layout
from derta_jax.models.transformer import Transformer
from derta_jax.train import checkpoint, flops, lora, mesh as mesh_lib
from derta_jax.train.config import ConfigError, build_model_config, validate
from derta_jax.train.data import build_training_data
from derta_jax.train.metrics import MetricLogger, plot_loss_curve, tail_mean
from derta_jax.train.optimizer import learning_rate_schedule, make_optimizer
from derta_jax.train.preemption import StopFlag
from derta_jax.train.step import BATCH_KEYS, TrainState, make_train_step

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """jax.distributed.initialize from flags; with initialize=auto, only when
    derta_jax.train.cluster sees a multi-process launch (single-host runs skip it)."""
    from derta_jax.train import cluster

    d = config.distributed
    if d.initialize not in ("auto", "always", "never"):
        raise ConfigError(f"distributed.initialize={d.initialize!r}: use auto, always or never")
    if d.initialize == "never":
        return
    explicit = bool(d.coordinator_address)
    if d.initialize == "auto" and not explicit:
        reason = cluster.multi_process_reason()
        if reason is None:
            return
        log.info("distributed.initialize=auto: %s; calling jax.distributed.initialize()", reason)
    # CPU-only multi-process runs (tests, laptops) need a collectives backend; GPU and TPU
    # clients ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    kwargs = {}
    if explicit:
        kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                      process_id=d.process_id)
    jax.distributed.initialize(**kwargs)


def loss_config(config: ml_collections.ConfigDict) -> derta.LossConfig:
    lo = config.loss
    return derta.LossConfig(normalization=lo.normalization, lambda_mle=lo.lambda_mle,
                            lambda_rto=lo.lambda_rto, rto_keep_rate=lo.rto_keep_rate,
                            chunk_size=lo.chunk_size,
                            num_position_buckets=lo.num_position_buckets).validate()


def _write_resolved_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    path = workdir / "config.json"
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if path.exists() and path.read_text() != text:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path.rename(workdir / f"config.{stamp}.json")
        log.warning("config differs from the one this workdir was started with; "
                    "the old one is kept as config.%s.json", stamp)
    path.write_text(text)


def abstract_model(model_cfg, seed: int, lora_settings: Optional[lora.LoraSettings] = None):
    """The model as the trainer splits it, without allocating it (shapes, dtypes and
    logical-axis metadata only); shared with the planner so both see the same split.

    -> (graphdef, trained params, frozen base params or None, rest): the trained params
    are all nnx.Params, or with `lora_settings` the adapters (the base is then frozen)."""
    if lora_settings is None:
        abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(seed)))
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        return graphdef, params, None, rest
    abstract = lora.abstract_lora_model(model_cfg, lora_settings, seed)
    return nnx.split(abstract, nnx.LoRAParam, nnx.Param, ...)


def _init_params(model_cfg, seed: int, shardings):
    def init():
        return nnx.to_pure_dict(nnx.state(Transformer(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param))

    return jax.jit(init, out_shardings=shardings)()


def _load_hf_params(hf_dir: str, model_cfg, abstract_params_state, shardings):
    from derta_jax.hf import mapping, safetensors_io

    state = mapping.load_hf_tensors(abstract_params_state, safetensors_io.iter_checkpoint(hf_dir),
                                    model_cfg, jnp.dtype(model_cfg.param_dtype),
                                    shardings=shardings)
    return nnx.to_pure_dict(state)


def under_mesh(mesh: jax.sharding.Mesh, fn):
    """`fn` called with `mesh` as the ambient mesh (jax.set_mesh), so that it is traced
    under it: the MoE block then dispatches tokens per shard (derta_jax/models/moe.py)
    instead of sorting the global batch on every device."""
    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    return call


def _global_batch(local: dict, sharding) -> dict:
    """This process's rows -> one global jax.Array per key (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]))
            for k in BATCH_KEYS}


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run(config: ml_collections.ConfigDict) -> dict:
    maybe_initialize_distributed(config)
    validate(config, jax.device_count())
    if not config.workdir:
        raise ConfigError("workdir='': set --config.workdir=DIR (checkpoints, metrics, config)")
    try:
        workdir = layout.resolve(config.workdir)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    is_main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        _write_resolved_config(config, workdir)

    # -- data -----------------------------------------------------------------------------
    model_cfg = build_model_config(config)

    def build_data():
        return build_training_data(config, workdir, process_index=jax.process_index(),
                                   process_count=jax.process_count())

    # Process 0 trains the tokenizer / writes the token cache; the others then read them.
    data = build_data() if is_main else None
    _barrier("derta_jax:data_ready")
    data = data or build_data()
    if len(data.tokenizer) > model_cfg.vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size}: the tokenizer has "
                         f"{len(data.tokenizer)} tokens")
    plan_steps = data.pipeline.num_steps
    total_steps = config.train.max_steps if config.train.max_steps > 0 else plan_steps
    if total_steps > plan_steps:
        raise ConfigError(f"train.max_steps={config.train.max_steps}: the data gives only "
                         f"{plan_steps} steps in train.num_epochs={config.train.num_epochs} "
                         f"epochs; raise num_epochs or lower max_steps")
    if is_main:
        layout.write_model_config(workdir, model_cfg)
        (workdir / "data_report.json").write_text(json.dumps(data.report, indent=2, default=str))
        _copy_tokenizer(data.tokenizer_dir, workdir)

    # -- model, shardings, optimiser ---------------------------------------------------------
    mesh = mesh_lib.make_mesh(config.mesh)
    lora_settings = lora.LoraSettings.from_config(config.lora) if config.lora.enabled else None
    if lora_settings is not None and is_main:
        with layout.staged(workdir) as local:  # lora.py writes local files
            lora.write_record(local, lora_settings, base_hf_dir=config.model.hf_dir,
                              seed=config.seed)
    graphdef, abstract_params, abstract_base, rest = abstract_model(model_cfg, config.seed,
                                                                     lora_settings)
    param_shardings = nnx.to_pure_dict(mesh_lib.state_shardings(abstract_params, mesh))
    optimizer = make_optimizer(config.optim, total_steps)
    schedule = learning_rate_schedule(config.optim, total_steps)
    abstract_pure = nnx.to_pure_dict(abstract_params)
    opt_shardings = opt_state_shardings(optimizer, abstract_pure, param_shardings, mesh)
    rep = mesh_lib.replicated(mesh)
    state_shardings = TrainState(rep, param_shardings, opt_shardings, rep)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    loss_cfg = loss_config(config)
    micro = config.train.micro_batches
    micro_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        *batch_sharding.spec))

    def constrain(mb):
        return {k: jax.lax.with_sharding_constraint(v, micro_spec) for k, v in mb.items()}

    prepare_model = None
    if lora_settings is not None and lora_settings.dropout > 0:
        prepare_model = lora.set_dropout_keys
    step_fn = make_train_step(graphdef, optimizer, loss_cfg, micro,
                              aux_loss_coef=model_cfg.router_aux_loss_coef,
                              micro_batch_constraint=constrain, prepare_model=prepare_model)
    batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
    if abstract_base is None:
        frozen_shardings = None
        frozen = nnx.to_pure_dict(rest)
    else:  # LoRA: the frozen base, reloaded at every start (checkpoints hold only adapters)
        frozen_shardings = nnx.to_pure_dict(mesh_lib.state_shardings(abstract_base, mesh))
        if config.model.hf_dir:
            frozen = _load_hf_params(config.model.hf_dir, model_cfg, abstract_base, frozen_shardings)
        else:
            frozen = lora.init_base_params(model_cfg, config.seed, frozen_shardings)
    jit_step = under_mesh(mesh, jax.jit(
        step_fn, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
        out_shardings=(state_shardings, None), donate_argnums=(0,)))

    mngr = checkpoint.manager(workdir, config.checkpoint.keep, config.checkpoint.async_save)
    base_rng = jax.random.key(config.seed)
    start = checkpoint.latest_step(mngr)
    if start is not None:
        abstract_p = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_pure, param_shardings)
        abstract_o = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  jax.eval_shape(optimizer.init, abstract_pure), opt_shardings)
        restored = checkpoint.restore(mngr, start, abstract_p, abstract_o, base_rng, rep)
        state = TrainState(jnp.asarray(restored["step"], jnp.int32), restored["params"],
                           restored["opt_state"], restored["rng"])
        iterator = data.pipeline.iterator(restored["data"])
        log.info("resumed from step %d of %s", start, workdir)
    else:
        if lora_settings is not None:
            params = lora.init_adapters(model_cfg, lora_settings, config.seed, param_shardings)
        elif config.model.hf_dir:
            params = _load_hf_params(config.model.hf_dir, model_cfg, abstract_params,
                                     param_shardings)
        else:
            params = _init_params(model_cfg, config.seed, param_shardings)
        opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
        state = TrainState(jnp.zeros((), jnp.int32), params, opt_state, base_rng)
        iterator = data.pipeline.iterator()
        start = 0

    # -- the loop ---------------------------------------------------------------------------
    tokens_per_step_flops = flops.training_flops_per_token(
        model_cfg, config.data.max_length, lora=lora_settings is not None,
        lora_rank=lora_settings.rank if lora_settings is not None else 0)
    peak = config.train.peak_flops_per_device or flops.peak_flops_for(jax.devices()[0].device_kind)
    logger = MetricLogger(workdir, total_steps, is_main)
    stop = StopFlag(every=config.train.log_every)
    stop.install()
    step = start
    tokens_since_log = jnp.zeros((), jnp.float32)
    nonfinite = jnp.zeros((), jnp.bool_)
    t_start = time.perf_counter()
    last_metrics: dict = {}
    try:
        while step < total_steps:
            local = next(iterator)
            batch = _global_batch(local, batch_sharding)
            state, metrics = jit_step(state, frozen, batch)
            step += 1
            stopping = stop.should_stop(step)
            nonfinite = nonfinite | ~jnp.isfinite(metrics["loss"])
            tokens_since_log = tokens_since_log + jnp.sum(batch["segment_ids"] > 0)
            is_log = step % config.train.log_every == 0 or step == total_steps
            is_save = step % config.checkpoint.every_steps == 0 or step == total_steps
            if is_log:
                host = jax.device_get(metrics)
                host["lr"] = float(schedule(step - 1))
                tokens = float(tokens_since_log)
                last_metrics = logger.log(step, host, data.pipeline.plan.epoch_progress(
                    min(step, plan_steps - 1)), tokens)
                if "tokens_per_sec" in last_metrics and peak:
                    last_metrics["mfu"] = (last_metrics["tokens_per_sec"] * tokens_per_step_flops
                                           / (peak * jax.device_count()))
                tokens_since_log = jnp.zeros((), jnp.float32)
            if (is_log or is_save or stopping) and bool(nonfinite):
                mngr.wait_until_finished()
                raise NonFiniteLossError(
                    f"non-finite loss at or before step {step}; the last complete checkpoint "
                    f"(step {checkpoint.latest_step(mngr)}) is kept and nothing newer is saved. "
                    f"Lower optim.lr or check the data.")
            if is_save or stopping:
                checkpoint.save(mngr, step, state.params, state.opt_state, state.rng,
                                iterator.get_state(), force=True)
            if stopping:
                log.warning("%s: checkpoint saved at step %d; exiting", stop.reason(), step)
                break
    finally:
        mngr.wait_until_finished()
        mngr.close()
        logger.close()
    summary = {
        "workdir": os.fspath(workdir), "steps": step, "total_steps": total_steps,
        "interrupted": stop.stopped, "seconds": time.perf_counter() - t_start,
        # one logged step is one noisy batch: the summary reports a mean over the run's tail
        "tail_mean_metrics": tail_mean(logger.history),
        "last_logged_metrics": {k: v for k, v in last_metrics.items()
                                if isinstance(v, float) and math.isfinite(v)},
        "data": {k: data.report[k] for k in ("examples", "rows", "steps_per_epoch",
                                              "non_pad_fraction", "refusal_id")},
    }
    if is_main:
        summary["loss_curve"] = plot_loss_curve(logger.history, workdir / "loss_curve.png")
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def opt_state_shardings(optimizer, abstract_pure, param_shardings, mesh):
    """Shardings of `optimizer`'s state: moments shard like their parameters, scalars
    (step counts) are replicated. Public for the planner, which must place the state
    exactly as the trainer does. `abstract_pure`: the trained params as a pure dict."""
    import optax

    rep = mesh_lib.replicated(mesh)
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding,
                                 jax.eval_shape(optimizer.init, abstract_pure), param_shardings,
                                 transform_non_params=lambda _: rep)


def _copy_tokenizer(tokenizer_dir: str, workdir: epath.Path) -> None:
    """Keep the tokenizer files with the run, so export writes them next to the weights."""
    try:
        from derta_jax.hf.tokenizer_files import copy_tokenizer_files
    except ImportError:
        return
    target = epath.Path(layout.hf_files_path(workdir))
    if not target.is_dir() or not any(target.iterdir()):
        with layout.staged(target) as local:
            copy_tokenizer_files(tokenizer_dir, local)
