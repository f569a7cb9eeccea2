"""A derta_jax workdir: its layout, its Orbax checkpoints and the records of its run.

Why one module: `convert` writes workdirs, the trainer writes and resumes them, `export`,
`evaluate`, `plan` and the trainer's `model.init_from` read them. One module owns the
layout, the one Orbax CheckpointManager, and the JSON records, so all of them agree:

    WORKDIR/
      model_config.json          ModelConfig as JSON (dataclasses.asdict)
      config.json                the trainer's resolved ConfigDict (training runs)
      data_report.json           what the data loader built (refusal string and id, ...)
      lora.json                  LoRA runs: the settings and where the frozen base came from
      hf_files/                  tokenizer files + generation_config.json of the source model,
                                 source_config.json (its config.json; export keeps its extras)
      checkpoints/<step>/        Orbax CheckpointManager steps (step 0 = converted weights)
        params/                  the parameters (all of them, or only the LoRA adapters)
        opt_state/ train/ data/  training runs: optimiser state, step + PRNG key, loader state

`params` is a plain nested dict of arrays keyed like the NNX module tree (layer indices as
ints), in the layout the model config says (stacked when scan_layers=True). Saves are
asynchronous for the trainer and atomic (Orbax renames a complete step into place), so a
run killed at any moment resumes from the last COMPLETE step. Restores target the
shardings of their abstract arguments: a run saved on 8 devices restores on 1 and back,
and on a pod each process reads only its own shards.

A workdir may be a local path or a URI (`gs://bucket/run`): every path goes through
derta_jax.paths (etils.epath) and Orbax.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from derta_jax.models.config import ModelConfig
from derta_jax.models.lora import LoraSettings
from derta_jax.paths import PathLike, resolve


class _QuietPartialRestore(logging.Filter):
    """Drops Orbax's warnings about what every reader does on purpose: a restore that skips
    checkpoint items ("Item 'opt_state' was found in the checkpoint, but could not be
    restored": evaluation and export read the parameters alone) and a read-only manager
    ("Given directory is read only=..."; each evaluation of an attack step printed both)."""

    QUIET = ("was found in the checkpoint, but could not be restored",
             "Given directory is read only=")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.QUIET)


logging.getLogger("absl").addFilter(_QuietPartialRestore())

MODEL_CONFIG_FILE = "model_config.json"
RUN_CONFIG_FILE = "config.json"
DATA_REPORT_FILE = "data_report.json"
LORA_RECORD_FILE = "lora.json"
HF_FILES_DIR = "hf_files"
SOURCE_CONFIG_FILE = "source_config.json"
CHECKPOINTS_DIR = "checkpoints"
PARAMS_ITEM = "params"


class WorkdirError(ValueError):
    """A workdir that cannot be used as asked; the message names the path and the field."""


def is_workdir(path: PathLike) -> bool:
    return (resolve(path) / MODEL_CONFIG_FILE).is_file()


def checkpoints_path(workdir: PathLike) -> str:
    return os.fspath(resolve(workdir) / CHECKPOINTS_DIR)


def hf_files_path(workdir: PathLike) -> str:
    return os.fspath(resolve(workdir) / HF_FILES_DIR)


# ----------------------------------------------------------------------------- records

def write_model_config(workdir: PathLike, config: ModelConfig) -> str:
    root = resolve(workdir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / MODEL_CONFIG_FILE
    path.write_text(json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True) + "\n")
    return os.fspath(path)


def _read_json(path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WorkdirError(f"{path}: line {err.lineno}: not JSON ({err.msg})") from None


def read_model_config(workdir: PathLike) -> ModelConfig:
    path = resolve(workdir) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {workdir} a derta_jax workdir "
                                f"(written by derta_jax.convert or the trainer)?")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise WorkdirError(f"{path}: expected a JSON object")
    known = {field.name for field in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise WorkdirError(f"{path}: unknown ModelConfig field(s) {unknown}")
    try:
        return ModelConfig(**data).validate()
    except (TypeError, ValueError) as e:
        raise WorkdirError(f"{path}: {e}") from None


def write_lora_record(workdir: PathLike, settings: LoraSettings, *, base: dict,
                      seed: int = 0) -> str:
    """WORKDIR/lora.json: the settings and where the frozen base comes from.

    `base` is {"hf_dir": DIR} or {"workdir": DIR, "step": N} (a local path recorded
    absolute, a URI as it is) or {"init_seed": seed}; plus, for every kind,
    "model_config_sha256": the hash of the base's ModelConfig, which a later start or
    export checks before it puts the adapters on a base."""
    record = {**dataclasses.asdict(settings), "seed": int(seed), "base": base}
    path = resolve(workdir) / LORA_RECORD_FILE
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return os.fspath(path)


def read_lora_record(workdir: PathLike) -> Optional[dict]:
    """-> {'settings': LoraSettings, 'seed': int, 'base': {...}}, or None for a non-LoRA run."""
    path = resolve(workdir) / LORA_RECORD_FILE
    if not path.is_file():
        return None
    record = _read_json(path)
    if not isinstance(record, dict):
        raise WorkdirError(f"{path}: expected a JSON object, got {type(record).__name__}")
    fields = {f.name for f in dataclasses.fields(LoraSettings)}
    for name in sorted(fields | {"seed", "base"}):
        if name not in record and name != "dtype":
            raise WorkdirError(f"{path}: missing field {name!r}")
    base = record["base"]
    if not isinstance(base, dict) or not ({"hf_dir", "workdir", "init_seed"} & set(base)):
        raise WorkdirError(f"{path}: field 'base' must hold 'hf_dir', 'workdir' or "
                           f"'init_seed', got {base!r}")
    try:
        settings = LoraSettings(**{k: record[k] for k in fields if k in record}).validate()
    except (TypeError, ValueError) as err:
        raise WorkdirError(f"{path}: {err}") from None
    return {"settings": settings, "seed": int(record["seed"]), "base": base}


def model_config_hash(config: ModelConfig) -> str:
    """sha256 of the architecture fields of a ModelConfig (runtime fields such as dtypes,
    remat and scan_layers excluded: a base stored stacked or in bf16 is the same base)."""
    import hashlib

    runtime = {"param_dtype", "dtype", "remat_policy", "scan_layers", "attention_impl"}
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in runtime}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What evaluation must know about how a run was trained (read from its workdir)."""

    refusal_string: Optional[str] = None  # data.refusal_string of the run (the RTO target)
    template: Optional[str] = None  # data.template of the run


def read_run_info(workdir: PathLike) -> RunInfo:
    """The refusal string and template of the training run in `workdir` (both None for a
    converted workdir, which no run trained)."""
    root = resolve(workdir)
    refusal = template = None
    report = root / DATA_REPORT_FILE
    if report.is_file():
        data = _read_json(report)
        refusal = data.get("refusal_string") if isinstance(data, dict) else None
    config = root / RUN_CONFIG_FILE
    if config.is_file():
        data = _read_json(config)
        section = data.get("data", {}) if isinstance(data, dict) else {}
        template = section.get("template") if isinstance(section, dict) else None
        refusal = refusal or (section.get("refusal_string") if isinstance(section, dict) else None)
    return RunInfo(refusal_string=refusal, template=template)


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_manager(workdir: PathLike, *, read_only: bool = False,
                       keep: Optional[int] = None,
                       async_save: bool = False) -> ocp.CheckpointManager:
    """THE Orbax CheckpointManager over WORKDIR/checkpoints (every reader and writer).
    Read-only managers know the params item's handler, so its metadata (the stored tree)
    can be read before a restore."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, read_only=read_only,
                                           create=not read_only,
                                           enable_async_checkpointing=async_save,
                                           **({"save_interval_steps": 0} if read_only else {}))
    handlers = {PARAMS_ITEM: ocp.StandardCheckpointHandler()} if read_only else None
    return ocp.CheckpointManager(checkpoints_path(workdir), options=options,
                                 item_handlers=handlers)


def split_checkpoint_path(text: str) -> tuple[str, Optional[int]]:
    """'WORKDIR' -> (WORKDIR, None: its latest step); 'WORKDIR/checkpoints/N' -> (WORKDIR, N)."""
    text = os.fspath(text).rstrip("/")
    head, _, last = text.rpartition("/")
    parent, _, name = head.rpartition("/")
    if last.isdigit() and name == CHECKPOINTS_DIR:
        return parent, int(last)
    return text, None


def checkpoint_steps(workdir: PathLike) -> list[int]:
    if not resolve(checkpoints_path(workdir)).is_dir():
        return []
    with checkpoint_manager(workdir, read_only=True) as manager:
        return sorted(manager.all_steps())


def latest_step(workdir: PathLike) -> Optional[int]:
    steps = checkpoint_steps(workdir)
    return steps[-1] if steps else None


def resolve_step(workdir: PathLike, step: Optional[int]) -> int:
    """`step`, checked to exist (the latest complete one when None)."""
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{checkpoints_path(workdir)}: no checkpoint steps found")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"{checkpoints_path(workdir)}: no step {step} (--step; "
                                f"available: {steps})")
    return step


def save_params(workdir: PathLike, step: int, params: Any) -> None:
    """Saves `params` (a pure pytree) as item "params" of checkpoint `step` (convert)."""
    with checkpoint_manager(workdir) as manager:
        manager.save(step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(params)}))
        manager.wait_until_finished()


def _with_host_sharding(abstract: Any) -> Any:
    device = jax.local_devices(backend="cpu")[0]  # host memory, never an accelerator's

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct) and getattr(x, "sharding", None) is None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                        sharding=jax.sharding.SingleDeviceSharding(device))
        return x

    return jax.tree.map(leaf, abstract)


def restore_params(workdir: PathLike, abstract_params: Any, step: Optional[int] = None
                   ) -> tuple[Any, int]:
    """Restores item "params" (latest step when `step` is None); returns (params, step).

    `abstract_params` is the target pytree of jax.ShapeDtypeStruct: with shardings, each
    process reads only its own shards; without, into host memory. A checkpoint whose tree
    does not match (another model, a LoRA run read as a full one) is one WorkdirError
    naming the workdir and the first differing parameter, not Orbax's tree dump."""
    step = resolve_step(workdir, step)
    with checkpoint_manager(workdir, read_only=True) as manager:
        stored = _stored_tree(manager, step)
        if stored is not None:
            _check_tree(workdir, step, stored, abstract_params)
        restored = manager.restore(step, args=ocp.args.Composite(
            **{PARAMS_ITEM: ocp.args.StandardRestore(_with_host_sharding(abstract_params))}))
    return restored[PARAMS_ITEM], step


def _stored_tree(manager: ocp.CheckpointManager, step: int) -> Optional[dict]:
    """The stored params tree as {dotted path: shape}, from the checkpoint's metadata."""
    try:
        tree = manager.item_metadata(step)[PARAMS_ITEM]
    except (KeyError, TypeError, ValueError, FileNotFoundError):
        return None  # no readable metadata: Orbax's own check at restore time remains
    if tree is None:
        return None
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[_dotted(path)] = tuple(getattr(leaf, "shape", ()) or ())
    return flat


def _dotted(path) -> str:
    parts = []
    for key in path:
        parts.append(str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))))
    return ".".join(parts)


def _check_tree(workdir: PathLike, step: int, stored: dict, abstract: Any) -> None:
    wanted = {_dotted(path): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    where = f"{checkpoints_path(workdir)}/{step}"
    missing = sorted(set(wanted) - set(stored))
    extra = sorted(set(stored) - set(wanted))
    if missing or extra:
        lora_stored = any("_lora_" in name for name in stored)
        lora_wanted = any("_lora_" in name for name in wanted)
        if lora_stored != lora_wanted:
            what = "LoRA adapters" if lora_stored else "full parameters"
            raise WorkdirError(f"{where}: holds {what}, but {MODEL_CONFIG_FILE} / "
                               f"{LORA_RECORD_FILE} of {resolve(workdir)} say otherwise")
        name = (missing or extra)[0]
        raise WorkdirError(f"{where}: parameter {name} is "
                           f"{'missing from the checkpoint' if missing else 'not in the model'}"
                           f" ({len(missing)} missing, {len(extra)} unexpected): a checkpoint "
                           f"of another model?")
    for name, shape in wanted.items():
        if stored[name] and tuple(stored[name]) != shape:
            raise WorkdirError(f"{where}: parameter {name} has shape {stored[name]}, the model "
                               f"expects {shape}: a checkpoint of another model?")


# ----------------------------------------------------------------------------- training state

def save_training_state(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any,
                        rng: jax.Array, data_state: dict, force: bool = False) -> bool:
    """One training step's checkpoint: params, opt_state, train (step, key), data (loader)."""
    train = {"step": np.asarray(step, np.int64), "rng": jax.random.key_data(rng)}
    return manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        train=ocp.args.StandardSave(train),
        data=ocp.args.JsonSave(data_state),
    ), force=force)


def restore_training_state(manager: ocp.CheckpointManager, step: int, abstract_params: Any,
                           abstract_opt_state: Any, rng_impl_key: jax.Array,
                           replicated: jax.sharding.Sharding) -> dict:
    """Restores training step `step` onto the shardings carried by the abstract targets
    (the small `train` item onto `replicated`), whatever topology it was saved with."""
    key_data = jax.random.key_data(rng_impl_key)
    abstract_train = {"step": jax.ShapeDtypeStruct((), np.int64, sharding=replicated),
                      "rng": jax.ShapeDtypeStruct(key_data.shape, key_data.dtype,
                                                  sharding=replicated)}
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(abstract_opt_state),
        train=ocp.args.StandardRestore(abstract_train),
        data=ocp.args.JsonRestore(),
    ))
    rng = jax.random.wrap_key_data(np.asarray(restored["train"]["rng"]))
    return {"params": restored["params"], "opt_state": restored["opt_state"],
            "step": int(restored["train"]["step"]), "rng": rng, "data": restored["data"]}
