"""Hugging Face tensor names <-> derta_jax parameter paths: one table per family.

Why: import (safetensors -> model) and export (model -> safetensors) must agree exactly,
so both directions read the same table. Each row says which HF tensor pattern feeds
which model parameter, and how the array is rearranged (a `Transform` with a forward
and an exact inverse, so import then export is the identity bit for bit).

Placeholders: `{layer}` (decoder layer) and `{expert}` (Mixtral expert). In the model,
an unscanned layer is its own path element (`layers.3.attn...`); with scanned layers
(`config.scan_layers`) the layer is the param's leading axis instead. A Mixtral expert is
always an index into the param's expert axis (after the layer axis when scanned).

Public API (used by derta_jax/hf/convert.py and export.py):
    hf_to_model_path(hf_name, config) -> Target | None
    model_to_hf_names(config) -> list of HF names the model expects
    load_hf_tensors(model_or_state, tensors, config, dtype=None, shardings=None) -> nnx.State
    export_hf_tensors(model_or_state, config) -> Iterator[(hf_name, np.ndarray)]
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from derta_jax.models.config import ModelConfig


# ----------------------------------------------------------------------------------------
# Array transforms (pure, exact, each with its inverse)
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Transform:
    """How an HF array becomes a model array (`to_model`) and back (`to_hf`).

    `hf_shape(model_shape)` gives the HF shape expected for a model slice, so a shape
    mismatch is reported before anything is rearranged.
    """

    name: str
    to_model: Callable[[np.ndarray, ModelConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]
    hf_shape: Callable[[tuple, ModelConfig], tuple]


def _t(a):
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


IDENTITY = Transform("identity", lambda a, c: a, lambda a, c: a, lambda s, c: tuple(s))
# torch Linear weight [out, in] <-> kernel [in, out]
TRANSPOSE = Transform("transpose", lambda a, c: _t(a), lambda a, c: _t(a),
                      lambda s, c: (s[1], s[0]))
# q/k/v: [heads*head_dim, D] <-> [D, heads, head_dim]
SPLIT_HEADS_OUT = Transform(
    "transpose+split_heads",
    lambda a, c: _t(a).reshape(a.shape[1], -1, c.head_dim),
    lambda a, c: _t(a.reshape(a.shape[0], a.shape[1] * a.shape[2])),
    lambda s, c: (s[1] * s[2], s[0]))
# o: [D, heads*head_dim] <-> [heads, head_dim, D]
SPLIT_HEADS_IN = Transform(
    "transpose+split_heads_in",
    lambda a, c: _t(a).reshape(-1, c.head_dim, a.shape[0]),
    lambda a, c: _t(a.reshape(a.shape[0] * a.shape[1], a.shape[2])),
    lambda s, c: (s[2], s[0] * s[1]))


class Rule(NamedTuple):
    hf: str          # HF name pattern with {layer} / {expert}
    path: str        # model path pattern (unscanned form), dot separated
    transform: Transform
    when: str = "always"  # "always" | "untied" (lm_head only exists when not tied)


_ATTENTION_RULES = [
    Rule("model.embed_tokens.weight", "embedder.embedding", IDENTITY),
    Rule("model.layers.{layer}.input_layernorm.weight", "layers.{layer}.attn_norm.scale", IDENTITY),
    Rule("model.layers.{layer}.self_attn.q_proj.weight", "layers.{layer}.attn.q_proj.kernel", SPLIT_HEADS_OUT),
    Rule("model.layers.{layer}.self_attn.k_proj.weight", "layers.{layer}.attn.k_proj.kernel", SPLIT_HEADS_OUT),
    Rule("model.layers.{layer}.self_attn.v_proj.weight", "layers.{layer}.attn.v_proj.kernel", SPLIT_HEADS_OUT),
    Rule("model.layers.{layer}.self_attn.o_proj.weight", "layers.{layer}.attn.o_proj.kernel", SPLIT_HEADS_IN),
    Rule("model.layers.{layer}.post_attention_layernorm.weight", "layers.{layer}.mlp_norm.scale", IDENTITY),
]
_HEAD_RULES = [
    Rule("model.norm.weight", "final_norm.scale", IDENTITY),
    Rule("lm_head.weight", "lm_head.kernel", TRANSPOSE, when="untied"),
]
_DENSE_MLP_RULES = [
    Rule("model.layers.{layer}.mlp.gate_proj.weight", "layers.{layer}.mlp.gate_proj.kernel", TRANSPOSE),
    Rule("model.layers.{layer}.mlp.up_proj.weight", "layers.{layer}.mlp.up_proj.kernel", TRANSPOSE),
    Rule("model.layers.{layer}.mlp.down_proj.weight", "layers.{layer}.mlp.down_proj.kernel", TRANSPOSE),
]
_MOE_RULES = [
    Rule("model.layers.{layer}.block_sparse_moe.gate.weight", "layers.{layer}.moe.router.kernel", TRANSPOSE),
    Rule("model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight", "layers.{layer}.moe.w_gate", TRANSPOSE),
    Rule("model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight", "layers.{layer}.moe.w_up", TRANSPOSE),
    Rule("model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight", "layers.{layer}.moe.w_down", TRANSPOSE),
]

TABLES: dict[str, list[Rule]] = {
    "llama": _ATTENTION_RULES + _DENSE_MLP_RULES + _HEAD_RULES,
    "mistral": _ATTENTION_RULES + _DENSE_MLP_RULES + _HEAD_RULES,
    "mixtral": _ATTENTION_RULES + _MOE_RULES + _HEAD_RULES,
}


def table(config: ModelConfig) -> list[Rule]:
    if config.family not in TABLES:
        raise ValueError(f"model.family={config.family!r}: no HF name table (known: {sorted(TABLES)})")
    return [r for r in TABLES[config.family] if r.when == "always" or not config.tie_embeddings]


def _pattern_regex(pattern: str) -> re.Pattern:
    escaped = re.escape(pattern).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(
        r"\{expert\}", r"(?P<expert>\d+)")
    return re.compile(escaped + r"\Z")


# ----------------------------------------------------------------------------------------
# Name <-> path
# ----------------------------------------------------------------------------------------

class Target(NamedTuple):
    """Where one HF tensor lives in the model.

    path: the model state path (a tuple as in nnx.to_flat_state; ints for unscanned
    layer indices); layer/expert: the HF indices (None when the name has none);
    index: the leading indices inside the param the transformed tensor fills (() for
    the whole param; (layer,) for scanned layers; (expert,) or (layer, expert) for MoE);
    transform: the array rearrangement.
    """

    path: tuple
    layer: Optional[int]
    expert: Optional[int]
    index: tuple
    transform: Transform


def _model_path(rule: Rule, layer: Optional[int], scanned: bool) -> tuple:
    parts: list[Any] = []
    for part in rule.path.split("."):
        if part == "{layer}":
            if not scanned:
                parts.append(layer)
        else:
            parts.append(part)
    return tuple(parts)


def _target(rule: Rule, layer: Optional[int], expert: Optional[int], config: ModelConfig) -> Target:
    index: tuple = ()
    if layer is not None and config.scan_layers:
        index += (layer,)
    if expert is not None:
        index += (expert,)
    return Target(_model_path(rule, layer, config.scan_layers), layer, expert, index, rule.transform)


def hf_to_model_path(hf_name: str, config: ModelConfig) -> Optional[Target]:
    """The model location of HF tensor `hf_name`, or None when the table has no such name
    (or the index is out of range for the config)."""
    for rule in table(config):
        match = _pattern_regex(rule.hf).match(hf_name)
        if not match:
            continue
        groups = match.groupdict()
        layer = int(groups["layer"]) if groups.get("layer") is not None else None
        expert = int(groups["expert"]) if groups.get("expert") is not None else None
        if layer is not None and not 0 <= layer < config.num_layers:
            return None
        if expert is not None and not 0 <= expert < config.num_experts:
            return None
        return _target(rule, layer, expert, config)
    return None


def _expand(rule: Rule, config: ModelConfig) -> Iterator[tuple[str, Optional[int], Optional[int]]]:
    layers = range(config.num_layers) if "{layer}" in rule.hf else [None]
    experts = range(config.num_experts) if "{expert}" in rule.hf else [None]
    for layer in layers:
        for expert in experts:
            name = rule.hf
            if layer is not None:
                name = name.replace("{layer}", str(layer))
            if expert is not None:
                name = name.replace("{expert}", str(expert))
            yield name, layer, expert


def model_to_hf_names(config: ModelConfig) -> list[str]:
    """Every HF tensor name a checkpoint for `config` holds, in table order."""
    return [name for rule in table(config) for name, _, _ in _expand(rule, config)]


def _hf_order(config: ModelConfig) -> list[tuple[str, Target]]:
    """(name, target) in Hugging Face's order: embeddings, layer by layer, norm, head."""
    entries = []
    for rule in table(config):
        for name, layer, expert in _expand(rule, config):
            entries.append(((-1 if rule.path.startswith("embedder") else
                             (config.num_layers if layer is None else layer)), name,
                            _target(rule, layer, expert, config)))
    entries.sort(key=lambda e: e[0])  # stable: table order within a layer
    return [(name, target) for _, name, target in entries]


# ----------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------

class MappingError(ValueError):
    """A checkpoint does not fit the model: names the tensor and the file."""


def _flat_params(model_or_state) -> nnx.State:
    if isinstance(model_or_state, nnx.Module):
        return nnx.state(model_or_state, nnx.Param)
    return model_or_state


def _is_float(dtype) -> bool:
    return bool(jnp.issubdtype(np.dtype(dtype), jnp.floating))  # includes bfloat16


def load_hf_tensors(model_or_abstract_state, tensors: Iterable[tuple[str, Any, str]],
                    config: ModelConfig, dtype=None, shardings=None) -> nnx.State:
    """Build the model's Param state from a stream of (hf_name, array, source_file).

    model_or_abstract_state: a model, or its Param state (abstract is fine:
    `derta_jax.weights.abstract_params(cfg)`).
    dtype: cast every tensor to it (default: each param's own dtype).
    shardings: optional state-shaped tree (nnx.State or nested dict, as from
    nnx.get_named_sharding / nnx.to_pure_dict) of jax.sharding.Sharding; each finished
    param goes straight onto its sharding, each process copying only its own shards.

    Whole params are placed as soon as their tensor arrives; params assembled from
    several tensors (scanned layers, MoE experts) are accumulated in one host buffer and
    placed when complete. Raises MappingError for an unknown, duplicated, missing or
    mis-shaped tensor, or one that cannot be cast; never returns a partial state.
    """
    state = _flat_params(model_or_abstract_state)
    flat = dict(nnx.to_flat_state(state))
    flat_shardings = _flat_shardings(shardings)
    expected_names = set(model_to_hf_names(config))
    seen: dict[str, str] = {}
    buffers: dict[tuple, np.ndarray] = {}
    filled: dict[tuple, set] = {}
    needed: dict[tuple, int] = {}
    values: dict[tuple, jax.Array] = {}

    def place(path: tuple, array: np.ndarray) -> None:
        sharding = flat_shardings.get(path)
        if sharding is None:
            values[path] = jnp.asarray(array)
        else:  # each process copies only its own shards (multi-host safe)
            values[path] = jax.make_array_from_callback(array.shape, sharding,
                                                        lambda index: array[index])

    for hf_name, array, source in tensors:
        where = f"tensor {hf_name!r} in {source}"
        if config.tie_embeddings and hf_name == "lm_head.weight":
            continue  # tied: the unembedding is the embedding; HF may still store a copy
        target = hf_to_model_path(hf_name, config)
        if target is None or target.path not in flat:
            raise MappingError(f"{where}: unexpected tensor: the {config.family} model with "
                               f"{config.num_layers} layers has no parameter for it")
        if hf_name in seen:
            raise MappingError(f"{where}: duplicate tensor (also in {seen[hf_name]})")
        seen[hf_name] = source
        variable = flat[target.path]
        full_shape = tuple(variable.shape)
        slice_shape = full_shape[len(target.index):]
        want = target.transform.hf_shape(slice_shape, config)
        got = tuple(np.shape(array))
        if got != want:
            raise MappingError(f"{where}: shape {got} does not match the expected {want} "
                               f"(model parameter {'.'.join(map(str, target.path))} {full_shape})")
        array = np.asarray(array)
        if not _is_float(array.dtype):
            raise MappingError(f"{where}: dtype {array.dtype} cannot be cast to a floating "
                               f"parameter dtype")
        target_dtype = np.dtype(dtype) if dtype is not None else np.dtype(variable.dtype)
        model_array = target.transform.to_model(array, config).astype(target_dtype, copy=False)
        if not target.index:
            place(target.path, model_array)
            continue
        if target.path not in buffers:
            buffers[target.path] = np.empty(full_shape, target_dtype)
            filled[target.path] = set()
            needed[target.path] = int(np.prod(full_shape[:len(target.index)]))
        buffers[target.path][target.index] = model_array
        filled[target.path].add(target.index)
        if len(filled[target.path]) == needed[target.path]:
            place(target.path, buffers.pop(target.path))

    missing = sorted(expected_names - set(seen), key=_natural_key)
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        sources = sorted(set(seen.values()))
        raise MappingError(f"missing tensors {shown} (read from {', '.join(sources) or 'no file'})")
    unfilled = [".".join(map(str, p)) for p in flat if p not in values]
    if unfilled:  # a param no table row covers: a bug in the table, not in the checkpoint
        raise MappingError(f"model parameters not covered by the {config.family} table: {unfilled}")
    return nnx.from_flat_state([(path, variable.replace(values[path])) for path, variable in flat.items()])


def _flat_shardings(shardings) -> dict:
    """{state path: Sharding} from an nnx.State of shardings or a nested dict of them."""
    if shardings is None:
        return {}
    if isinstance(shardings, nnx.State):
        flat = nnx.to_flat_state(shardings)
    else:
        from flax import traverse_util

        flat = traverse_util.flatten_dict(dict(shardings)).items()
    return {tuple(path): (s.get_value() if isinstance(s, nnx.Variable) else s) for path, s in flat}


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------

def export_hf_tensors(model_or_state, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (hf_name, numpy array) in Hugging Face's order, in each param's dtype.

    Arrays are fetched to the host one tensor at a time (a layer slice of a scanned
    param, an expert slice of an MoE param).
    """
    flat = dict(nnx.to_flat_state(_flat_params(model_or_state)))
    for name, target in _hf_order(config):
        if target.path not in flat:
            layout = "stacked" if config.scan_layers else "per-layer"
            raise MappingError(f"export: the model has no parameter {'.'.join(map(str, target.path))} "
                               f"for HF tensor {name!r} (config.scan_layers={config.scan_layers} "
                               f"expects {layout} layer parameters; does the config match the state?)")
        value = flat[target.path][...]
        if target.index:
            value = value[target.index]
        yield name, target.transform.to_hf(np.asarray(jax.device_get(value)), config)
