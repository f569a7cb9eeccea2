"""The on-disk layout of a derta_jax workdir, shared by convert, export and the trainer.

Why: `convert` writes a workdir that `export` (and the trainer, to start from it) must
read, and the trainer writes workdirs that `export` must read. One module owns the layout:

    WORKDIR/
      model_config.json          ModelConfig as JSON (dataclasses.asdict)
      hf_files/                  tokenizer files + generation_config.json of the source model,
                                 source_config.json (its config.json; export keeps its extras)
      checkpoints/<step>/        orbax CheckpointManager steps (step 0 = converted weights)
        params/                  item "params": nnx.to_pure_dict(nnx.state(model, nnx.Param))
        (opt_state/, data_iter/, ... items the trainer adds next to params)

`params` is a plain nested dict of arrays keyed like the NNX module tree (layer indices as
ints), in the layout the model config says (stacked when scan_layers=True).

A workdir may be a local path or a URI (`gs://bucket/run`, also s3://, az://): every path
goes through etils.epath (`resolve`), never os.path.abspath or open(), which would turn
`gs://b/r` into the local directory `$PWD/gs:/b/r`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from typing import Any, Iterator, Optional, Union

import jax
import orbax.checkpoint as ocp
from etils import epath

from derta_jax.models.config import ModelConfig

MODEL_CONFIG_FILE = "model_config.json"
HF_FILES_DIR = "hf_files"
SOURCE_CONFIG_FILE = "source_config.json"
CHECKPOINTS_DIR = "checkpoints"
PARAMS_ITEM = "params"


PathLike = Union[str, os.PathLike]


def is_remote(workdir: PathLike) -> bool:
    """A URI (gs://, s3://, ...) rather than a local path."""
    return "://" in os.fspath(workdir)


def resolve(workdir: PathLike) -> epath.Path:
    """The workdir as an epath.Path: local paths made absolute (every process and the
    resumed run agree on them), URIs kept as they are."""
    text = os.fspath(workdir)
    if not is_remote(text):
        return epath.Path(os.path.abspath(text))
    try:
        return epath.Path(text)
    except KeyError:
        raise ValueError(f"workdir={text!r}: unsupported URI scheme; use a local path or "
                         f"gs://, s3://, az://") from None


@contextlib.contextmanager
def staged(directory: PathLike) -> Iterator[str]:
    """A local directory for code that only writes local files (tokenizers' save_pretrained,
    shutil): `directory` itself when local; else a temporary one whose files are copied
    into `directory` on exit."""
    target = resolve(directory)
    if not is_remote(target):
        target.mkdir(parents=True, exist_ok=True)
        yield os.fspath(target)
        return
    with tempfile.TemporaryDirectory(prefix="derta_jax_stage_") as local:
        yield local
        copy_tree(local, target)


@contextlib.contextmanager
def fetched(directory: PathLike) -> Iterator[str]:
    """A local directory holding the files of `directory`, for code that only reads local
    files (AutoTokenizer.from_pretrained, shutil): `directory` itself when local; else a
    temporary copy, deleted on exit. Raises FileNotFoundError naming a missing remote one."""
    if not is_remote(directory):
        yield os.fspath(directory)
        return
    source = resolve(directory)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such directory")
    with tempfile.TemporaryDirectory(prefix="derta_jax_fetch_") as local:
        copy_tree(source, local)
        yield local


def check_output_dir(directory: PathLike, overwrite: bool) -> None:
    """The output rule of every CLI (safetensors_io.prepare_output_dir), for any path and
    without creating anything: an existing non-directory is refused, so is a non-empty
    directory unless `overwrite`."""
    path = resolve(directory)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True "
                              f"(--overwrite) to write into it")


def copy_tree(src: PathLike, dst: PathLike) -> list[str]:
    """Copies the files under `src` into `dst` (either side local or remote), overwriting;
    returns the relative paths copied.

    Walks with iterdir, not epath's walk: for gs:// that yields its directories without
    the scheme ('bucket/run/x'), which would then be read as local paths."""
    src, dst = epath.Path(src), epath.Path(dst)
    copied = []
    for rel in _relative_files(src):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).copy(dst / rel, overwrite=True)
        copied.append(rel)
    return copied


def _relative_files(directory: epath.Path, prefix: str = "") -> Iterator[str]:
    for child in sorted(directory.iterdir(), key=lambda p: p.name):
        rel = os.path.join(prefix, child.name)
        if child.is_dir():
            yield from _relative_files(child, rel)
        else:
            yield rel


def checkpoints_path(workdir: PathLike) -> str:
    return os.fspath(resolve(workdir) / CHECKPOINTS_DIR)


def hf_files_path(workdir: PathLike) -> str:
    return os.fspath(resolve(workdir) / HF_FILES_DIR)


def write_model_config(workdir: PathLike, config: ModelConfig) -> str:
    root = resolve(workdir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / MODEL_CONFIG_FILE
    path.write_text(json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True) + "\n")
    return os.fspath(path)


def read_model_config(workdir: PathLike) -> ModelConfig:
    path = resolve(workdir) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {workdir} a derta_jax workdir "
                                f"(written by derta_jax.convert or the trainer)?")
    data = json.loads(path.read_text())
    known = {field.name for field in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown ModelConfig field(s) {unknown}")
    try:
        return ModelConfig(**data).validate()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def checkpoint_manager(workdir: str, read_only: bool = False,
                       max_to_keep: Optional[int] = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, read_only=read_only,
                                           create=not read_only,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(checkpoints_path(workdir), options=options)


def save_params(workdir: str, step: int, params: Any) -> None:
    """Saves `params` (a pure pytree) as item "params" of checkpoint `step`."""
    with checkpoint_manager(workdir) as manager:
        manager.save(step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(params)}))
        manager.wait_until_finished()


def latest_step(workdir: PathLike) -> Optional[int]:
    if not epath.Path(checkpoints_path(workdir)).is_dir():
        return None
    with checkpoint_manager(workdir, read_only=True) as manager:
        return manager.latest_step()


def _with_host_sharding(abstract: Any) -> Any:
    device = jax.local_devices(backend="cpu")[0]  # host memory, never an accelerator's

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct) and getattr(x, "sharding", None) is None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                        sharding=jax.sharding.SingleDeviceSharding(device))
        return x

    return jax.tree.map(leaf, abstract)


def restore_params(workdir: str, abstract_params: Any, step: Optional[int] = None
                   ) -> tuple[Any, int]:
    """Restores item "params" (latest step when `step` is None); returns (params, step).

    `abstract_params` is the target pytree of jax.ShapeDtypeStruct (with shardings, or
    into host memory (the CPU device) when none is given). Other items of the step
    (opt_state, data_iter, ...) are left on disk.
    """
    if step is None:
        step = latest_step(workdir)
        if step is None:
            raise FileNotFoundError(f"{checkpoints_path(workdir)}: no checkpoint steps found")
    with checkpoint_manager(workdir, read_only=True) as manager:
        if step not in manager.all_steps():
            raise FileNotFoundError(f"{checkpoints_path(workdir)}: no step {step} "
                                    f"(available: {sorted(manager.all_steps())})")
        restored = manager.restore(step, args=ocp.args.Composite(
            **{PARAMS_ITEM: ocp.args.StandardRestore(_with_host_sharding(abstract_params))}))
    return restored[PARAMS_ITEM], step
