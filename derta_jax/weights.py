"""Models and their weights, built in one place for every command.

Why: training, the planner, convert, export and evaluation all need "the model for this
config, with these weights, on these shardings". Written once here, a change to how a
model is built, loaded, sharded or adapted is made once:

    model = abstract_model(cfg)                          # shapes only, nothing allocated
    parts = abstract_parts(cfg, seed, lora_settings)     # the trainer's split (trained/frozen)
    params = init_params(cfg, seed, shardings)           # random initialisation, on devices
    params = load_hf_params(hf_dir, cfg, shardings)      # streamed from safetensors
    params = restore_full_params(workdir, cfg, step, shardings)  # a workdir, full or LoRA
    loaded = load_model(path)                            # evaluation: HF dir or workdir

Every `params` is a pure nested dict (nnx.to_pure_dict layout) placed straight onto
`shardings` (a tree of jax.sharding.Sharding of the same structure) when given: each
process then holds (and, from Orbax, reads) only its own shards.

A workdir (derta_jax.workdir) holds either full parameters (a `convert` output, a full
fine-tuning run) or, for a LoRA run (WORKDIR/lora.json), only adapters over a frozen base
recorded in lora.json: an HF directory, another workdir, or the seed. `restore_full_params`
turns either into the full parameters of a plain model; LoRA adapters are merged with
derta_jax.models.lora.merge_lora, the formula export uses, so an evaluated LoRA workdir and
its merged export hold the same weights.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import jax
from flax import nnx

from derta_jax import paths
from derta_jax import workdir as wd
from derta_jax.models import lora, sharding as sharding_lib
from derta_jax.models.config import ModelConfig
from derta_jax.models.transformer import Transformer

# ----------------------------------------------------------------------------- shapes


def abstract_model(cfg: ModelConfig, lora_settings: Optional[lora.LoraSettings] = None,
                   seed: int = 0) -> nnx.Module:
    """The model (adapted when `lora_settings`) as ShapeDtypeStructs: nothing allocated.
    Each call returns a new module (its own Variables), so callers may change it."""
    graphdef, state = _abstract_split(cfg, lora_settings, seed)
    return nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf, state))


@functools.lru_cache(maxsize=32)
def _abstract_split(cfg: ModelConfig, lora_settings: Optional[lora.LoraSettings], seed: int):
    """Tracing the model's construction costs ~0.1-0.2 s; one command asks for the same
    abstract model many times (trainer, restore, evaluation, export)."""
    def build():
        model = Transformer(cfg, rngs=nnx.Rngs(seed))
        if lora_settings is not None:
            lora.add_lora(model, lora_settings, rngs=nnx.Rngs(params=lora.lora_init_key(seed)))
        return model

    return nnx.split(nnx.eval_shape(build))


def abstract_params(cfg: ModelConfig) -> nnx.State:
    """The plain model's nnx.Param state, abstract."""
    return nnx.state(abstract_model(cfg), nnx.Param)


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters of the plain model, counted from abstract shapes."""
    import math

    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params(cfg)))


def abstract_parts(cfg: ModelConfig, seed: int,
                   lora_settings: Optional[lora.LoraSettings] = None):
    """The model as the trainer splits it, abstract: (graphdef, trained params, frozen base
    params or None, rest). Trained = every nnx.Param, or with `lora_settings` the adapters
    (nnx.LoRAParam) over a frozen base."""
    model = abstract_model(cfg, lora_settings, seed)
    if lora_settings is None:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return graphdef, params, None, rest
    return nnx.split(model, nnx.LoRAParam, nnx.Param, ...)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """A pure tree of ShapeDtypeStructs carrying `shardings` (Orbax / AOT compile targets)."""
    if shardings is None:
        return abstract
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


# ----------------------------------------------------------------------------- values

def init_params(cfg: ModelConfig, seed: int, shardings: Any = None) -> dict:
    """The plain model's parameters initialised from `seed`, created on their shardings."""
    def init():
        return nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param))

    return jax.jit(init, out_shardings=shardings)()


def init_adapters(cfg: ModelConfig, settings: lora.LoraSettings, seed: int,
                  shardings: Any = None) -> dict:
    """The LoRA adapters' initial values from the seed alone (A uniform, B zero); the base's
    random initialisation is dead code that XLA removes."""
    def init():
        model = Transformer(cfg, rngs=nnx.Rngs(seed))
        lora.add_lora(model, settings, rngs=nnx.Rngs(params=lora.lora_init_key(seed)))
        return nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))

    return jax.jit(init, out_shardings=shardings)()


def load_hf_params(hf_dir: str, cfg: ModelConfig, shardings: Any = None) -> dict:
    """An HF directory's safetensors streamed tensor by tensor into the model's parameters
    (cast to cfg.param_dtype), each placed on its sharding as soon as it is complete."""
    from derta_jax.hf import mapping, safetensors_io

    tensors = safetensors_io.iter_checkpoint(hf_dir, dtype=cfg.param_dtype)
    state = mapping.load_hf_tensors(abstract_params(cfg), tensors, cfg, cfg.param_dtype,
                                    shardings=shardings)
    return nnx.to_pure_dict(state)


def check_same_layout(stored: ModelConfig, wanted: ModelConfig) -> None:
    """A workdir's parameters fit `wanted` when the architecture is the same and the layers
    are stored the same way (stacked or not); dtypes may differ (Orbax casts on restore).
    Raises WorkdirError saying what differs (the caller names the workdir)."""
    if wd.model_config_hash(stored) != wd.model_config_hash(wanted):
        diff = [f.name for f in dataclasses.fields(ModelConfig)
                if getattr(stored, f.name) != getattr(wanted, f.name)
                and f.name not in ("param_dtype", "dtype", "remat_policy", "scan_layers",
                                   "attention_impl")]
        raise wd.WorkdirError(f"its model differs from this one ({', '.join(diff[:4])} differ)")
    if stored.scan_layers != wanted.scan_layers:
        raise wd.WorkdirError(
            f"stores layers {'stacked' if stored.scan_layers else 'one by one'} but "
            f"model.scan_layers={wanted.scan_layers}; convert again with"
            f"{'' if wanted.scan_layers else 'out'} --scan_layers, or set model.scan_layers="
            f"{stored.scan_layers}")


def restore_full_params(workdir: str, cfg: Optional[ModelConfig] = None,
                        step: Optional[int] = None, shardings: Any = None,
                        base_hf_dir: Optional[str] = None) -> tuple[dict, int]:
    """The full parameters of a plain model from a workdir -> (params, step).

    Full workdirs restore straight onto `shardings` (each process reads its own shards).
    LoRA workdirs: the recorded base (or `base_hf_dir`) with the adapters of `step` merged
    in on the host, then placed on `shardings`. `cfg` (default: the workdir's own) gives
    the dtypes and must describe the same architecture and layer layout."""
    stored = wd.read_model_config(workdir)
    cfg = cfg or stored
    try:
        check_same_layout(stored, cfg)
    except wd.WorkdirError as err:
        raise wd.WorkdirError(f"{workdir}: {err}") from None
    record = wd.read_lora_record(workdir)
    if record is None:
        target = with_shardings(nnx.to_pure_dict(abstract_params(cfg)), shardings)
        return wd.restore_params(workdir, target, step)
    settings = record["settings"]
    adapters_abstract = nnx.to_pure_dict(
        nnx.state(abstract_model(cfg, settings, record["seed"]), nnx.LoRAParam))
    adapters, step = wd.restore_params(workdir, adapters_abstract, step)
    base = load_lora_base(workdir, record, cfg, base_hf_dir=base_hf_dir)
    merged = lora.merge_into_params(base, adapters, settings)
    if shardings is not None:  # each process places its own shards (multi-host safe)
        merged = jax.tree.map(sharding_lib.put_global, merged, shardings)
    return merged, step


def lora_base_source(record: dict, base_hf_dir: Optional[str] = None) -> dict:
    """Where a LoRA run's frozen base comes from: {"hf_dir"}, {"workdir", "step"} or
    {"init_seed"} (`base_hf_dir` overrides the recorded place, e.g. after a move)."""
    if base_hf_dir:
        return {"hf_dir": base_hf_dir}
    return {k: v for k, v in record["base"].items() if k != "model_config_sha256"}


def load_lora_base(workdir: str, record: dict, cfg: ModelConfig, shardings: Any = None,
                   base_hf_dir: Optional[str] = None) -> dict:
    """The frozen base parameters of the LoRA run in `workdir`, checked against the hash of
    the base's ModelConfig that the run recorded (lora.json, base.model_config_sha256)."""
    source = lora_base_source(record, base_hf_dir)
    where = f"{paths.resolve(workdir) / wd.LORA_RECORD_FILE}: base"
    recorded_hash = record["base"].get("model_config_sha256")
    if "hf_dir" in source:
        check_lora_hf_base(workdir, record, cfg, source["hf_dir"])
        return load_hf_params(source["hf_dir"], cfg, shardings)
    if "workdir" in source:
        base_dir = source["workdir"]
        if not wd.is_workdir(base_dir):
            raise FileNotFoundError(f"{where}.workdir={base_dir}: not a derta_jax workdir "
                                    f"(no {wd.MODEL_CONFIG_FILE})")
        check_base_hash(where, base_dir, recorded_hash, wd.read_model_config(base_dir), cfg)
        params, _ = restore_full_params(base_dir, cfg, source.get("step"), shardings)
        return params
    return init_params(cfg, int(source["init_seed"]), shardings)


def check_lora_hf_base(workdir: str, record: dict, cfg: ModelConfig, hf_dir: str) -> None:
    """The HF directory a LoRA run's base is read from (load_lora_base, and export, which
    streams it) must be local, hold a config.json, and be the model the run was trained on."""
    where = f"{paths.resolve(workdir) / wd.LORA_RECORD_FILE}: base"
    if paths.is_remote(hf_dir):
        raise wd.WorkdirError(f"{where}.hf_dir={hf_dir}: a remote HF directory; copy it to "
                              f"a local one and pass --base_hf_dir=DIR")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"{where}.hf_dir={hf_dir}: no config.json there (the "
                                f"LoRA run's base model); pass --base_hf_dir=DIR")
    from derta_jax.hf.config import model_config_from_hf

    check_base_hash(where, hf_dir, record["base"].get("model_config_sha256"),
                    model_config_from_hf(hf_dir), cfg)


def check_base_hash(where: str, base: str, recorded: Optional[str], base_cfg: ModelConfig,
                    cfg: ModelConfig) -> None:
    """The base of a LoRA run must be the model it was trained on: same architecture as
    the workdir's, and the hash lora.json recorded (when it recorded one)."""
    found = wd.model_config_hash(base_cfg)
    if found != wd.model_config_hash(cfg) or (recorded and recorded != found):
        raise wd.WorkdirError(f"{where}: {base} is not the model this LoRA run was trained on "
                              f"(base.model_config_sha256 differs)")


# ----------------------------------------------------------------------------- evaluation

@dataclasses.dataclass
class LoadedModel:
    """A plain model with its weights, ready to decode, and where it came from."""

    model: Transformer
    config: ModelConfig
    tokenizer_dir: str  # local or remote directory of the tokenizer files
    run: wd.RunInfo  # the run's refusal string / template (empty for an HF directory)
    step: Optional[int]  # the checkpoint step (None for an HF directory)


def load_model(path: str, *, step: Optional[int] = None, base_hf_dir: Optional[str] = None,
               mesh: Optional[jax.sharding.Mesh] = None, dtype: Optional[str] = None,
               compute_dtype: Optional[str] = None,
               scan_layers: Optional[bool] = None) -> LoadedModel:
    """An HF model directory or a derta_jax workdir (full or LoRA, any step, local or
    remote) as a plain model. Errors name `path` (the --model flag).

    mesh: the weights go straight onto the trainer's shardings on this mesh (an HF
    directory streamed tensor by tensor, a full workdir read shard by shard). dtype:
    parameters in this dtype (e.g. "bfloat16"; default: as stored); compute_dtype:
    activations (default: `dtype`). scan_layers: an HF directory's layers stacked (one
    compiled layer body, scanned) or one by one (default: ModelConfig's); a workdir keeps
    the layout it was trained with."""
    remote = paths.is_remote(path)

    def shardings_for(cfg: ModelConfig):
        if mesh is None:
            return None
        from derta_jax.models.sharding import state_shardings

        return nnx.to_pure_dict(state_shardings(abstract_params(cfg), mesh))

    def with_dtype(cfg: ModelConfig) -> ModelConfig:
        params = dtype or cfg.param_dtype
        return cfg.replace(param_dtype=params, dtype=compute_dtype or dtype or cfg.dtype)

    if wd.is_workdir(path):
        cfg = with_dtype(wd.read_model_config(path))
        params, step = restore_full_params(path, cfg, step, shardings_for(cfg),
                                           base_hf_dir=base_hf_dir)
        tokenizer_dir, run = wd.hf_files_path(path), wd.read_run_info(path)
    elif remote:
        raise FileNotFoundError(f"--model={path}: no {wd.MODEL_CONFIG_FILE} there; a remote "
                                f"--model must be a derta_jax workdir (copy an HF model "
                                f"directory to a local one)")
    elif not os.path.isdir(path):
        raise FileNotFoundError(f"--model={path}: no such directory (an HF model directory "
                                f"or a derta_jax workdir)")
    elif not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model={path}: neither an HF model directory "
                                f"(config.json) nor a derta_jax workdir (model_config.json)")
    else:
        if step is not None:
            raise ValueError(f"--step={step}: {path} is an HF directory, which has no steps")
        from derta_jax.hf.config import model_config_from_hf

        cfg = with_dtype(model_config_from_hf(path))
        if scan_layers is not None:
            cfg = cfg.replace(scan_layers=scan_layers)
        params = load_hf_params(path, cfg, shardings_for(cfg))
        tokenizer_dir, run = path, wd.RunInfo()
    state = abstract_params(cfg)
    nnx.replace_by_pure_dict(state, params)
    graphdef, _ = nnx.split(abstract_model(cfg))
    return LoadedModel(nnx.merge(graphdef, state), cfg, tokenizer_dir, run, step)
