"""The training configuration: one ConfigDict schema shared by every recipe in configs/.

A recipe file (configs/X.py) starts from `default_config()` and changes only what differs,
so every field that exists is listed here once, with its meaning. `validate()` runs at
start-up and names the field that is wrong (`optim.lr=-1.0: must be > 0`), so a typo
fails before a pod is paid for, not after an hour of compilation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import ml_collections

from derta_jax.data.mixture import RECIPES
from derta_jax.data.pipeline import MIXING_EPOCHS
from derta_jax.data.sources import SourceError, parse_sources
from derta_jax.data.templates import TEMPLATE_NAMES as TEMPLATES
from derta_jax.loss import NORMALIZATIONS, OBJECTIVES, LossConfig
from derta_jax.models.config import ModelConfig
from derta_jax.train.cluster import INITIALIZE_MODES

SCHEDULES = ("cosine", "linear", "constant")
MESH_AXES = ("data", "fsdp", "tensor", "expert")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = ""  # where checkpoints, metrics, the resolved config and plots go
    c.seed = 0

    # --- model: a preset name, an HF directory, or explicit ModelConfig fields -------------
    c.model = ml_collections.ConfigDict()
    c.model.preset = ""  # name in derta_jax.models.presets (e.g. "mistral7b"); "" = fields below
    c.model.hf_dir = ""  # start from this Hugging Face checkpoint dir (config.json + safetensors)
    # start from a derta_jax workdir (a convert output or a training run; WORKDIR or
    # WORKDIR/checkpoints/N; local or gs://): each process restores only its own shards
    c.model.init_from = ""
    # A model of more than 1B parameters with neither hf_dir nor init_from is refused
    # (validate_against_model) unless this says that random initial weights are meant.
    c.model.from_scratch = False
    for name, value in ModelConfig().__dict__.items():
        if name == "rope_scaling":
            continue  # a dict, set by presets / config.json; override via model.rope_scaling_json
        if value is None:  # Optional[int] fields stay overridable from the command line
            value = ml_collections.config_dict.placeholder(int)
        setattr(c.model, name, value)
    c.model.rope_scaling_json = ""  # JSON dict, e.g. '{"rope_type": "llama3", "factor": 8.0, ...}'

    # --- data ----------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""  # comma-separated reference-format JSONL files (prefix/text/safe)
    c.data.triples = ""  # JSONL of {question, safe_response, harmful_response}: mixture on the fly
    c.data.helpful = ""  # JSONL of {instruction, output}
    # named sources, comma-separated, each [tfds:|reference:|helpful:]LOCATION[@WEIGHT]:
    # TFDS data sets (python -m derta_jax.data.tfds_build), JSONL/Parquet files, local or gs://
    c.data.sources = ""
    c.data.tfds_data_dir = ""  # where tfds: sources live; "" = TFDS's default
    c.data.mixture_epoch = "all_rows"  # weighted sources: all_rows | first_exhausted
    c.data.recipe = "derta"
    c.data.num_safety = 6000  # safety ROWS in an on-the-fly mixture
    c.data.num_helpful = -1  # -1 = all
    c.data.synthetic = False  # generate the project's own synthetic safety world (tiny runs)
    c.data.synthetic_triples = 300
    c.data.synthetic_helpful = 1200
    c.data.template = "reference"
    c.data.plain_prefix = ""
    c.data.plain_suffix = "\n"
    c.data.tokenizer = ""  # directory of an HF tokenizer; "" = the model's hf_dir
    c.data.refusal_string = "Sorry"
    c.data.max_length = 1024
    c.data.packing = False
    c.data.on_error = "raise"  # or "skip" (skipped rows are reported, never silent)
    c.data.cache_dir = ""  # "" = <workdir>/cache
    c.data.shuffle_seed = 0

    # --- loss ----------------------------------------------------------------------------
    # the fields and defaults of derta_jax.loss.LossConfig (one schema, one set of defaults)
    c.loss = ml_collections.ConfigDict(dataclasses.asdict(LossConfig()))

    # --- optimiser -----------------------------------------------------------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_ratio = 0.03
    c.optim.end_lr_ratio = 0.0
    c.optim.weight_decay = 2e-5
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0

    # --- LoRA ----------------------------------------------------------------------------
    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = False
    c.lora.rank = 96
    c.lora.alpha = 16.0
    c.lora.dropout = 0.05
    c.lora.targets = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"

    # --- training loop -------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128  # GLOBAL sequences per optimiser step
    c.train.micro_batches = 1  # gradient accumulation steps inside one jitted step
    c.train.num_epochs = 2
    c.train.max_steps = -1  # -1 = num_epochs over the data
    c.train.log_every = 10
    c.train.peak_flops_per_device = 0.0  # 0 = look up the device kind (for MFU)

    # --- mesh: named axes; -1 = all remaining devices --------------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.mesh.expert = 1

    # --- checkpoints ---------------------------------------------------------------------
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    # --- multi-host ----------------------------------------------------------------------
    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = "auto"  # auto | always | never
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.cpu_collectives = "gloo"  # CPU-only multi-process runs (tests, laptops)
    return c


class ConfigError(ValueError):
    """A config value out of range; the message starts with the dotted field name."""


def _check(cond: bool, field: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{field}={value!r}: {why}")


def resolve_mesh_shape(mesh_sizes: Any, num_devices: int) -> dict:
    """Mesh axis sizes (config.mesh) with -1 resolved; the product must equal the device count."""
    sizes = {axis: int(mesh_sizes[axis]) for axis in MESH_AXES}
    unknown = [a for a, s in sizes.items() if s == -1]
    for axis, size in sizes.items():
        _check(size == -1 or size >= 1, f"mesh.{axis}", size, "must be >= 1 or -1 (fill)")
    _check(len(unknown) <= 1, "mesh", dict(sizes), "at most one axis may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if unknown:
        _check(num_devices % known == 0, f"mesh.{unknown[0]}", -1,
               f"the other axes ({known} devices) do not divide the {num_devices} devices")
        sizes[unknown[0]] = num_devices // known
    _check(math.prod(sizes.values()) == num_devices, "mesh", sizes,
           f"axis sizes multiply to {math.prod(sizes.values())}, but there are {num_devices} devices")
    return sizes


def validate(config: ml_collections.ConfigDict, num_devices: Optional[int] = None) -> None:
    """Checks types and ranges; with num_devices, also the mesh and batch divisibility."""
    d, lo, o, t, ck = config.data, config.loss, config.optim, config.train, config.checkpoint
    _check(d.recipe in RECIPES, "data.recipe", d.recipe, f"must be one of {RECIPES}")
    _check(d.template in TEMPLATES, "data.template", d.template, f"must be one of {TEMPLATES}")
    _check(d.max_length >= 8, "data.max_length", d.max_length, "must be >= 8")
    _check(d.num_safety >= 0, "data.num_safety", d.num_safety, "must be >= 0")
    _check(d.on_error in ("raise", "skip"), "data.on_error", d.on_error, "must be raise or skip")
    inline = bool(d.train_files or d.triples or d.helpful or d.synthetic)
    _check(inline or bool(d.sources.strip()), "data", "",
           "no data: set data.sources, data.train_files, data.triples/data.helpful, or "
           "data.synthetic=True")
    _check(d.mixture_epoch in MIXING_EPOCHS, "data.mixture_epoch", d.mixture_epoch,
           f"must be one of {MIXING_EPOCHS}")
    try:
        specs = parse_sources(d.sources)
    except SourceError as e:
        raise ConfigError(str(e)) from None
    _check(not (inline and any(s.weight is not None for s in specs)), "data.sources", d.sources,
           "weights mix the sources named there only; name every source in data.sources "
           "(drop data.train_files/triples/helpful/synthetic, or build them into a TFDS data "
           "set with python -m derta_jax.data.tfds_build)")
    _check(lo.normalization in NORMALIZATIONS, "loss.normalization", lo.normalization,
           f"must be one of {NORMALIZATIONS}")
    _check(0.0 < lo.rto_keep_rate <= 1.0, "loss.rto_keep_rate", lo.rto_keep_rate, "must be in (0, 1]")
    _check(lo.lambda_mle >= 0 and lo.lambda_rto >= 0, "loss.lambda_mle/lambda_rto",
           (lo.lambda_mle, lo.lambda_rto), "must be >= 0")
    _check(lo.chunk_size >= 1, "loss.chunk_size", lo.chunk_size, "must be >= 1")
    _check(lo.objective in OBJECTIVES, "loss.objective", lo.objective, f"must be one of {OBJECTIVES}")
    _check(lo.objective != "constrained_sft" or bool(config.model.init_from or config.model.hf_dir),
           "loss.objective", lo.objective,
           "keeps the model close to the aligned model it starts from, so it needs one: set "
           "model.init_from (a derta_jax workdir or checkpoint) or model.hf_dir")
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(o.schedule in SCHEDULES, "optim.schedule", o.schedule, f"must be one of {SCHEDULES}")
    _check(0.0 <= o.warmup_ratio < 1.0, "optim.warmup_ratio", o.warmup_ratio, "must be in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 = off)")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _check(t.micro_batches >= 1, "train.micro_batches", t.micro_batches, "must be >= 1")
    _check(t.batch_size % t.micro_batches == 0, "train.micro_batches", t.micro_batches,
           f"must divide train.batch_size={t.batch_size}")
    _check(t.num_epochs >= 1 or t.max_steps >= 1, "train.num_epochs", t.num_epochs,
           "must be >= 1 unless train.max_steps is set")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    _check(ck.every_steps >= 1, "checkpoint.every_steps", ck.every_steps, "must be >= 1")
    _check(ck.keep >= 1, "checkpoint.keep", ck.keep, "must be >= 1")
    _check(config.distributed.initialize in INITIALIZE_MODES, "distributed.initialize",
           config.distributed.initialize, "use auto, always or never")
    if config.lora.enabled:
        _check(config.lora.rank >= 1, "lora.rank", config.lora.rank, "must be >= 1")
        _check(0.0 <= config.lora.dropout < 1.0, "lora.dropout", config.lora.dropout,
               "must be in [0, 1)")
    if num_devices is not None:
        sizes = resolve_mesh_shape(config.mesh, num_devices)
        batch_axes = sizes["data"] * sizes["fsdp"]
        micro = t.batch_size // t.micro_batches
        _check(micro % batch_axes == 0, "train.batch_size", t.batch_size,
               f"the micro-batch of {micro} sequences (batch_size / micro_batches) must divide "
               f"over data x fsdp = {batch_axes} devices")
    if not (config.model.hf_dir or config.model.get("init_from")):  # the fields are the model
        _check_max_length(d.max_length, config.model.max_position_embeddings)


FROM_SCRATCH_LIMIT = 10**9  # parameters; above it, random initial weights must be asked for


def _check_max_length(max_length: int, max_position_embeddings: int, source: str = "") -> None:
    _check(max_length <= max_position_embeddings, "data.max_length", max_length,
           f"above model.max_position_embeddings={max_position_embeddings}{source}")


def validate_against_model(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> None:
    """The checks that need the run's ModelConfig (from the fields, model.hf_dir's
    config.json or model.init_from): the trainer calls it once the model config is built,
    before anything is written. The planner does not: it plans from-scratch runs too."""
    m = config.model
    weights = m.hf_dir or m.get("init_from")
    source = ""
    if m.hf_dir:
        source = f" (model.hf_dir={m.hf_dir!r})"
    elif m.get("init_from"):
        source = f" (model.init_from={m.init_from!r})"
    _check_max_length(config.data.max_length, model_cfg.max_position_embeddings, source)
    if weights or m.get("from_scratch"):
        return
    from derta_jax.weights import param_count

    # scan_layers stacks the same parameters: one layer's eval_shape, ~0.1 s even for 70B.
    count = param_count(model_cfg.replace(scan_layers=True))
    if count > FROM_SCRATCH_LIMIT:
        model = f"the config's preset {m.preset}" if m.preset else "the model of the config"
        other = " (or model.init_from=WORKDIR)" if "init_from" in m else ""
        raise ConfigError(
            f"model.hf_dir={m.hf_dir!r}: {model} has {count / 1e9:.2f}B parameters; starting it "
            f"from random weights is almost never wanted: set model.hf_dir=DIR{other}, or "
            f"model.from_scratch=True")


# Fields of ModelConfig that describe how to run a model rather than what it is: they are
# taken from the ConfigDict even when the architecture comes from an HF config.json.
RUNTIME_MODEL_FIELDS = ("param_dtype", "dtype", "remat_policy", "scan_layers", "attention_impl")


def loss_config(config: ml_collections.ConfigDict) -> LossConfig:
    """config.loss as the loss function's LossConfig (same fields, validated)."""
    try:
        return LossConfig(**config.loss.to_dict()).validate()
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None


def apply_preset(config: ml_collections.ConfigDict, name: str) -> None:
    """Copies a named architecture (derta_jax.models.presets) into config.model."""
    import json

    from derta_jax.models import presets

    model_config = presets.get_preset(name)
    config.model.preset = name
    for field, value in model_config.__dict__.items():
        if field == "rope_scaling":
            config.model.rope_scaling_json = json.dumps(value) if value else ""
        else:
            setattr(config.model, field, value)


def build_model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig a run uses: the architecture of model.init_from's workdir or of
    model.hf_dir's config.json if set (with this config's runtime fields), else the fields."""
    import json

    m = config.model
    runtime = {f: m[f] for f in RUNTIME_MODEL_FIELDS}
    if m.init_from and m.hf_dir:
        raise ConfigError(f"model.init_from={m.init_from!r}: set it or model.hf_dir, not both")
    if m.init_from:
        from derta_jax import workdir as wd

        from derta_jax.weights import check_same_layout

        source, _ = wd.split_checkpoint_path(m.init_from)
        try:
            stored = wd.read_model_config(source)
            model_cfg = stored.replace(**runtime).validate()
            check_same_layout(stored, model_cfg)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"model.init_from={m.init_from!r}: {err}") from None
        return model_cfg
    if m.hf_dir:
        from derta_jax.hf.config import model_config_from_hf

        return model_config_from_hf(m.hf_dir, **runtime).validate()
    fields = {f: m[f] for f in ModelConfig.__dataclass_fields__ if f != "rope_scaling"}
    if m.rope_scaling_json:
        try:
            fields["rope_scaling"] = json.loads(m.rope_scaling_json)
        except json.JSONDecodeError as e:
            raise ConfigError(f"model.rope_scaling_json={m.rope_scaling_json!r}: not JSON ({e})")
    try:
        return ModelConfig(**fields).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def apply_paper_full_finetuning(config: ml_collections.ConfigDict) -> None:
    """The paper's appendix A for full fine-tuning (Mistral-7B, LLaMA3-8B): global batch 128,
    2 epochs, lr 2e-5 cosine, warmup ratio 0.03, weight decay 2e-5, max length 1024, bf16
    compute on f32 master weights, RTO keep rate 5% ("dropout for the sorry token")."""
    config.model.update(dtype="bfloat16", param_dtype="float32", remat_policy="full",
                        scan_layers=True)
    config.data.update(template="reference", max_length=1024)
    config.loss.rto_keep_rate = 0.05
    config.optim.update(lr=2e-5, schedule="cosine", warmup_ratio=0.03, weight_decay=2e-5)
    config.train.update(batch_size=128, micro_batches=4, num_epochs=2)
    config.checkpoint.every_steps = 200


def apply_paper_lora(config: ml_collections.ConfigDict) -> None:
    """The paper's appendix A for LoRA (LLaMA3-70B, Mixtral-8x7B): r=96, alpha=16, dropout
    0.05 on q,k,v,o,gate,up,down; lr 1e-4, no warmup, max length 512, RTO keep rate 100%.
    The frozen base is bf16; adapters and their optimiser state are f32. The paper states no
    weight decay for LoRA: none is used."""
    config.model.update(dtype="bfloat16", param_dtype="bfloat16", remat_policy="full",
                        scan_layers=True)
    config.lora.update(enabled=True, rank=96, alpha=16.0, dropout=0.05)
    config.data.update(template="reference", max_length=512)
    config.loss.rto_keep_rate = 1.0
    config.optim.update(lr=1e-4, schedule="cosine", warmup_ratio=0.0, weight_decay=0.0)
    config.train.update(batch_size=128, micro_batches=8, num_epochs=2)
    config.checkpoint.every_steps = 100


def tiny_config() -> ml_collections.ConfigDict:
    """The embedded default (configs/tiny.py, and `reproduce`'s tiny track): a tiny Llama
    trained from scratch on the project's own synthetic safety world, a few CPU minutes.
    Lives in the package so that an installed derta_jax needs no configs/ directory."""
    c = default_config()
    c.workdir = "runs/tiny"
    c.model.update(family="llama", vocab_size=1024,  # the synthetic world's BPE tokenizer
                   hidden_size=128, intermediate_size=344, num_layers=3, num_heads=4,
                   num_kv_heads=2, head_dim=32, max_position_embeddings=512,
                   rope_theta=10000.0, tie_embeddings=True)
    c.data.update(synthetic=True, recipe="derta", num_safety=600, template="reference",
                  max_length=256, packing=True)
    c.loss.rto_keep_rate = 1.0
    c.optim.update(lr=1e-3, warmup_ratio=0.05, weight_decay=0.0)
    c.train.update(batch_size=16, micro_batches=1, num_epochs=8,  # 24 steps an epoch
                   max_steps=-1, log_every=20)
    c.checkpoint.update(every_steps=100, keep=2)
    return c

