"""`run(config)`: the whole training run, top to bottom.

    setup    config validated; distributed runtime up; workdir with the resolved config;
             tokenizer + rows -> token cache -> this process's batches (train.data)
    assemble the mesh, the state's shardings and the jitted step (train.state.assemble,
             the same step the planner compiles); weights from model.init_from /
             model.hf_dir / the seed, straight onto their shardings
    restore  the latest complete checkpoint of the workdir, if any
    loop     the step over the batches; metrics every log_every steps; async checkpoints
    summary  final checkpoint, loss-curve PNG, summary.json

The workdir may be local or a URI (gs://bucket/run): every path in it goes through
derta_jax.paths / derta_jax.workdir; Orbax writes checkpoints there directly.

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

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from derta_jax import paths
from derta_jax import workdir as wd
from derta_jax.train import cluster, flops, mesh as mesh_lib
from derta_jax.train.config import (ConfigError, build_model_config, validate,
                                    validate_against_model)
from derta_jax.train.data import build_training_data
from derta_jax.train.metrics import MetricLogger, plot_loss_curve, tail_mean
from derta_jax.train.preemption import StopFlag
from derta_jax.train.state import Assembly, assemble, base_record
from derta_jax.train.step import BATCH_KEYS

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def _write_resolved_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    path = workdir / "config.json"
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if path.exists() and path.read_text() != text:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path.rename(workdir / f"config.{stamp}.json")
        log.warning("config differs from the one this workdir was started with; "
                    "the old one is kept as config.%s.json", stamp)
    path.write_text(text)


def _global_batch(local: dict, sharding) -> dict:
    """This process's rows -> one global jax.Array per key (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]))
            for k in BATCH_KEYS}


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run(config: ml_collections.ConfigDict) -> dict:
    validate(config)  # the distributed settings too, before the runtime starts
    cluster.initialize_distributed(**config.distributed.to_dict())
    validate(config, jax.device_count())
    model_cfg = build_model_config(config)
    validate_against_model(config, model_cfg)  # bad input found before anything is written
    workdir, is_main = _setup_workdir(config)
    data = _build_data(config, workdir, model_cfg, is_main)
    total_steps = _total_steps(config, data.pipeline.num_steps)
    a = assemble(config, mesh_lib.make_mesh(config.mesh), total_steps, model_cfg)
    if a.lora_settings is not None and is_main:
        wd.write_lora_record(workdir, a.lora_settings, base=base_record(config, model_cfg),
                             seed=config.seed)
    frozen = a.load_frozen()
    mngr = wd.checkpoint_manager(workdir, keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)
    start = mngr.latest_step()
    if start is None:
        state, iterator, start = a.init_state(), data.pipeline.iterator(), 0
    else:
        state, data_state = a.restore_state(mngr, start)
        iterator = data.pipeline.iterator(data_state)
        log.info("resumed from step %d of %s", start, workdir)
    logger = MetricLogger(workdir, total_steps, is_main)
    stop = StopFlag(every=config.train.log_every)
    stop.install()
    t_start = time.perf_counter()
    try:
        step, last = _train(config, a, state, frozen, iterator, data, mngr, logger, stop,
                            start, total_steps)
    finally:
        mngr.wait_until_finished()
        mngr.close()
        logger.close()
    return _summary(workdir, is_main, data, logger, last, stop, step, total_steps,
                    time.perf_counter() - t_start)


def _setup_workdir(config: ml_collections.ConfigDict) -> tuple[epath.Path, bool]:
    if not config.workdir:
        raise ConfigError("workdir='': set --config.workdir=DIR (checkpoints, metrics, config)")
    try:
        workdir = paths.resolve(config.workdir)
    except ValueError as err:
        raise ConfigError(f"workdir: {err}") from None
    is_main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        _write_resolved_config(config, workdir)
    return workdir, is_main


def _build_data(config, workdir, model_cfg, is_main: bool):
    """Process 0 trains the tokenizer / writes the token cache; the others then read them."""
    def build():
        return build_training_data(config, workdir, process_index=jax.process_index(),
                                   process_count=jax.process_count())

    data = build() if is_main else None
    _barrier("derta_jax:data_ready")
    data = data or build()
    if len(data.tokenizer) > model_cfg.vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size}: the tokenizer has "
                         f"{len(data.tokenizer)} tokens")
    if is_main:
        wd.write_model_config(workdir, model_cfg)
        (workdir / wd.DATA_REPORT_FILE).write_text(json.dumps(data.report, indent=2, default=str))
        _copy_tokenizer(data.tokenizer_dir, workdir)
    return data


def _total_steps(config: ml_collections.ConfigDict, plan_steps: int) -> int:
    total = config.train.max_steps if config.train.max_steps > 0 else plan_steps
    if total > plan_steps:
        raise ConfigError(f"train.max_steps={config.train.max_steps}: the data gives only "
                          f"{plan_steps} steps in train.num_epochs={config.train.num_epochs} "
                          f"epochs; raise num_epochs or lower max_steps")
    return total


def _train(config, a: Assembly, state, frozen, iterator, data, mngr, logger: MetricLogger,
           stop: StopFlag, step: int, total_steps: int) -> tuple[int, dict]:
    """The step loop from `step` to `total_steps` -> (last step, last logged metrics)."""
    flops_per_token = flops.training_flops_per_token(
        a.model_cfg, config.data.max_length, lora=a.lora_settings is not None,
        lora_rank=a.lora_settings.rank if a.lora_settings is not None else 0)
    peak = config.train.peak_flops_per_device or flops.peak_flops_for(jax.devices()[0].device_kind)
    plan_steps = data.pipeline.num_steps
    tokens_since_log = jnp.zeros((), jnp.float32)
    nonfinite = jnp.zeros((), jnp.bool_)
    last_metrics: dict = {}
    while step < total_steps:
        batch = _global_batch(next(iterator), a.batch_sharding)
        state, metrics = a.step(state, frozen, batch)
        step += 1
        stopping = stop.should_stop(step)
        nonfinite = nonfinite | ~jnp.isfinite(metrics["loss"])
        tokens_since_log = tokens_since_log + jnp.sum(batch["segment_ids"] > 0)
        is_log = step % config.train.log_every == 0 or step == total_steps
        is_save = step % config.checkpoint.every_steps == 0 or step == total_steps
        if is_log:
            host = jax.device_get(metrics)
            host["lr"] = float(a.schedule(step - 1))
            last_metrics = logger.log(step, host, data.pipeline.plan.epoch_progress(
                min(step, plan_steps - 1)), float(tokens_since_log))
            if "tokens_per_sec" in last_metrics and peak:
                last_metrics["mfu"] = (last_metrics["tokens_per_sec"] * flops_per_token
                                       / (peak * jax.device_count()))
            tokens_since_log = jnp.zeros((), jnp.float32)
        if (is_log or is_save or stopping) and bool(nonfinite):
            mngr.wait_until_finished()
            raise NonFiniteLossError(
                f"non-finite loss at or before step {step}; the last complete checkpoint "
                f"(step {mngr.latest_step()}) is kept and nothing newer is saved. "
                f"Lower optim.lr or check the data.")
        if is_save or stopping:
            wd.save_training_state(mngr, step, state.params, state.opt_state, state.rng,
                                   iterator.get_state(), force=True)
        if stopping:
            log.warning("%s: checkpoint saved at step %d; exiting", stop.reason(), step)
            break
    return step, last_metrics


def _summary(workdir, is_main: bool, data, logger: MetricLogger, last_metrics: dict,
             stop: StopFlag, step: int, total_steps: int, seconds: float) -> dict:
    summary = {
        "workdir": os.fspath(workdir), "steps": step, "total_steps": total_steps,
        "interrupted": stop.stopped, "seconds": seconds,
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


def _copy_tokenizer(tokenizer_dir: str, workdir: epath.Path) -> None:
    """Keep the tokenizer files with the run, so export writes them next to the weights."""
    try:
        from derta_jax.hf.tokenizer_files import copy_tokenizer_files
    except ImportError:
        return
    target = epath.Path(wd.hf_files_path(workdir))
    if not target.is_dir() or not any(target.iterdir()):
        with paths.staged(target) as local:
            copy_tokenizer_files(tokenizer_dir, local)
