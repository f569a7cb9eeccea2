"""Model configuration: one frozen dataclass for the Llama / Mistral / Mixtral family.

A config is plain data. It is built from a preset (`PRESETS`), from a Hugging Face
`config.json` (derta_jax.hf.config), or from an ml_collections ConfigDict in configs/.
`validate()` names the field that is wrong, so a typo in a 70B run fails at start-up.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

FAMILIES = ("llama", "mistral", "mixtral")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn_out")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "chunked", "cpu_flash", "splash")  # auto: see
# models/attention.resolve_attention_impl


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 10000.0
    # HF-style rope scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0,
    # "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}.
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    sliding_window: Optional[int] = None  # Mistral: attend to at most this many past tokens
    num_experts: int = 0  # 0 = dense MLP; Mixtral: 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.0  # Mixtral's load-balancing loss weight (reported always)
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = None
    # Numerics and compilation.
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    remat_policy: str = "none"
    scan_layers: bool = False
    attention_impl: str = "auto"  # by the platform the step runs on (models/attention.py)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def __hash__(self) -> int:
        # The config is static data of the jitted model graph, so it must hash even
        # though rope_scaling is a dict: hash the dict's sorted items instead.
        values = tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v
                       for v in (getattr(self, f.name) for f in dataclasses.fields(self)))
        return hash(values)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "ModelConfig":
        def check(cond: bool, field: str, why: str) -> None:
            if not cond:
                raise ValueError(f"model.{field}={getattr(self, field)!r}: {why}")

        check(self.family in FAMILIES, "family", f"must be one of {FAMILIES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                  "must be a positive integer")
        check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
              f"must divide num_heads={self.num_heads}")
        check(self.rope_theta > 0, "rope_theta", "must be positive")
        check(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        check(self.sliding_window is None or self.sliding_window > 0, "sliding_window",
              "must be None or a positive integer")
        check(self.num_experts >= 0, "num_experts", "must be >= 0")
        if self.num_experts:
            check(0 < self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
                  f"must be in 1..num_experts={self.num_experts}")
        check(self.param_dtype in ("float32", "bfloat16", "float16"), "param_dtype",
              "must be float32, bfloat16 or float16")
        check(self.dtype in ("float32", "bfloat16", "float16"), "dtype",
              "must be float32, bfloat16 or float16")
        check(self.remat_policy in REMAT_POLICIES, "remat_policy", f"must be one of {REMAT_POLICIES}")
        check(self.attention_impl in ATTENTION_IMPLS, "attention_impl",
              f"must be one of {ATTENTION_IMPLS}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            check(kind in ("llama3", "linear", "default"), "rope_scaling",
                  "supported rope_type: llama3, linear, default")
        return self
