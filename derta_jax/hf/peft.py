"""LoRA in Hugging Face form: a run's adapters merged into streamed HF tensors, or laid out
as PEFT saves them (adapter_model.safetensors + adapter_config.json).

Why here and not in models/lora.py: these functions speak HF tensor names (the name table
of derta_jax.hf.mapping) and PEFT's file layout; the merge formula itself is
derta_jax.models.lora.merge_lora, shared with evaluation.

Layouts. A derta_jax kernel maps inputs to outputs as `y = x @ W` with W of shape
[*in_dims, *out_dims] (e.g. q_proj [D, H, Hd], o_proj [H, Hd, D]); its adapter is
A [*in_dims, r] and B [r, *out_dims], so `y = x @ W + (alpha / r) * (x @ A) @ B`.
PEFT stores an nn.Linear's adapter as lora_A.weight [r, in] and lora_B.weight [out, r]
with `W_hf [out, in]`, and merges `W_hf + (alpha / r) * lora_B @ lora_A`.

Export streams the base checkpoint through `merged_hf_tensors` (one tensor at a time,
merged in the model layout through the name table's exact transforms), or lays the
adapters out for PEFT with `peft_adapter_tensors` and `write_peft_adapter`.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Iterable, Iterator, Mapping, Optional

import numpy as np

from derta_jax.hf.safetensors_io import SafetensorsError, write_safetensors_file
from derta_jax.models.lora import merge_lora
from derta_jax.paths import prepare_output_dir


def peft_lora_weights(lora_a: np.ndarray, lora_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """derta_jax A [*in, r], B [r, *out] -> PEFT (lora_A.weight [r, in], lora_B.weight [out, r]).

    The flattened in/out dims follow the row-major order of the HF weight's in/out axes,
    which is how the name mapping reshapes [D, H, Hd] kernels into [H*Hd, D] weights.
    """
    rank = lora_a.shape[-1]
    a = np.asarray(lora_a).reshape(math.prod(lora_a.shape[:-1]), rank).T
    b = np.asarray(lora_b).reshape(rank, math.prod(lora_b.shape[1:])).T
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def merged_hf_tensors(base_tensors: Iterable[tuple], pairs: Mapping[tuple, tuple],
                      config, alpha: float, rank: int) -> Iterator[tuple[str, np.ndarray]]:
    """Streams a base checkpoint's (hf_name, array, source) and yields (hf_name, array) with
    every adapted weight replaced by W + (alpha/r) A B (merge_lora, in the model layout).

    Untouched tensors pass through unchanged; an unknown, missing or mis-shaped tensor, or
    an adapter whose base tensor never arrives, is an error naming the tensor and file."""
    from derta_jax.hf.mapping import MappingError, hf_to_model_path, model_to_hf_names

    expected = set(model_to_hf_names(config))
    seen: set[str] = set()
    merged_slices: dict[tuple, int] = {}
    for hf_name, array, source in base_tensors:
        if config.tie_embeddings and hf_name == "lm_head.weight":
            continue
        where = f"tensor {hf_name!r} in {source}"
        target = hf_to_model_path(hf_name, config)
        if target is None or hf_name not in expected:
            raise MappingError(f"{where}: unexpected tensor for the {config.family} model with "
                               f"{config.num_layers} layers")
        if hf_name in seen:
            raise MappingError(f"{where}: duplicate tensor")
        seen.add(hf_name)
        array = np.asarray(array)
        if target.path in pairs:
            lora_a, lora_b = (x[target.index] for x in pairs[target.path])
            kernel = target.transform.to_model(array, config)
            try:
                merged = merge_lora(kernel, lora_a, lora_b, alpha, rank)
            except ValueError as err:
                raise MappingError(f"{where}: {err}") from None
            array = target.transform.to_hf(merged, config)
            merged_slices[target.path] = merged_slices.get(target.path, 0) + 1
        yield hf_name, array
    missing = sorted(expected - seen)
    if missing:
        raise MappingError(f"base checkpoint: missing tensors {', '.join(missing[:8])}"
                           + (f", ... ({len(missing)} in all)" if len(missing) > 8 else ""))
    for path, (lora_a, _) in pairs.items():
        slices = merged_slices.get(path, 0)
        needed = _leading_slices(lora_a, config, path)
        if slices != needed:
            raise MappingError(f"adapter of {'.'.join(map(str, path))}: merged into {slices} "
                               f"base tensor(s), expected {needed}")


def _leading_slices(lora_a: np.ndarray, config, path: tuple) -> int:
    """How many HF tensors one adapted parameter spans (layers when scanned, experts)."""
    count = 1
    if config.scan_layers and path and path[0] == "layers":
        count *= config.num_layers
    if str(path[-1]).startswith("w_"):
        count *= config.num_experts
    return count


def peft_adapter_tensors(pairs: Mapping[tuple, tuple], config
                         ) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """PEFT's saved names and layout for the adapters, and the `target_modules` list.

    target_modules holds leaf names (q_proj, ...) when every layer's module of that name is
    adapted, else the full module names, so PEFT adapts exactly the modules that have
    weights. Mixtral expert adapters have no PEFT form: transformers 5 fuses the experts
    into 3-D parameters, which PEFT's LoRA does not adapt per expert."""
    from derta_jax.hf.mapping import hf_to_model_path, model_to_hf_names

    tensors: list[tuple[str, np.ndarray]] = []
    adapted: list[str] = []
    by_leaf: dict[str, list[str]] = {}
    for hf_name in model_to_hf_names(config):
        target = hf_to_model_path(hf_name, config)
        module = hf_name[:-len(".weight")] if hf_name.endswith(".weight") else hf_name
        by_leaf.setdefault(module.rsplit(".", 1)[-1], []).append(module)
        if target is None or target.path not in pairs:
            continue
        if target.expert is not None:
            raise ValueError(f"{'.'.join(map(str, target.path))}: expert adapters have no PEFT "
                             f"adapter form (transformers 5 fuses Mixtral's experts into 3-D "
                             f"parameters); export with --lora=merge")
        lora_a, lora_b = (x[target.index] for x in pairs[target.path])
        peft_a, peft_b = peft_lora_weights(lora_a, lora_b)
        tensors += [(f"base_model.model.{module}.lora_A.weight", peft_a),
                    (f"base_model.model.{module}.lora_B.weight", peft_b)]
        adapted.append(module)
    targets: list[str] = []
    for leaf in sorted({m.rsplit(".", 1)[-1] for m in adapted}):
        mine = [m for m in adapted if m.rsplit(".", 1)[-1] == leaf]
        targets += [leaf] if len(mine) == len(by_leaf[leaf]) else mine
    return tensors, targets


# ----------------------------------------------------------------------------- PEFT files

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_PEFT_NAME = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def peft_lora_config(rank: int, alpha: float, target_modules: list[str],
                     dropout: float = 0.0, base_model_name_or_path: Optional[str] = None,
                     **extra: Any) -> dict:
    """The adapter_config.json content peft's LoraConfig.from_pretrained reads."""
    if rank <= 0:
        raise ValueError(f"lora rank={rank!r}: must be positive")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(rank),
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        **extra,
    }


def write_peft_adapter(tensors: Iterable[tuple[str, np.ndarray]], out_dir: str,
                       adapter_config: Mapping[str, Any], overwrite: bool = False) -> list[str]:
    """Writes `adapter_model.safetensors` + `adapter_config.json` as peft saves them.

    Names must be peft's saved form, `base_model.model.<module path>.lora_A.weight` ([r, in])
    and `...lora_B.weight` ([out, r]); every A needs its B with the config's rank.
    """
    prepare_output_dir(out_dir, overwrite)
    rank = adapter_config.get("r")
    items = [(name, np.asarray(array)) for name, array in tensors]
    modules: dict[str, dict[str, np.ndarray]] = {}
    for name, array in items:
        match = _PEFT_NAME.fullmatch(name)
        if not match:
            raise SafetensorsError(f"adapter tensor {name!r}: expected a name like "
                                   f"'base_model.model.<module>.lora_A.weight'")
        if array.ndim != 2:
            raise SafetensorsError(f"adapter tensor {name!r}: expected 2 dimensions, got {array.shape}")
        rank_axis = 0 if match.group(2) == "A" else 1
        if array.shape[rank_axis] != rank:
            raise SafetensorsError(f"adapter tensor {name!r}: shape {array.shape} does not have "
                                   f"rank r={rank} on axis {rank_axis}")
        modules.setdefault(match.group(1), {})[match.group(2)] = array
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise SafetensorsError(f"adapter module {module!r}: needs both lora_A and lora_B")
    write_safetensors_file(os.path.join(out_dir, ADAPTER_FILE), items, {"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(dict(adapter_config), f, indent=2, sort_keys=True)
        f.write("\n")
    return [ADAPTER_FILE, ADAPTER_CONFIG_FILE]
