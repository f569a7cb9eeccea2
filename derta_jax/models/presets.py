"""Model presets for the paper's models, and parameter counting without allocation.

Why: configs/ and the tests refer to the published architectures by name; the counts
from derta_jax.weights.param_count (jax.eval_shape, nothing allocated, so a 70B model counts
on a laptop) are checked against the published sizes in tests/test_models_presets.py:
Mistral-7B 7.24B, Llama-3-8B 8.03B, Llama-3-70B 70.55B, Mixtral-8x7B 46.70B.

Architecture numbers are those of the public config.json files of
mistralai/Mistral-7B-v0.1, meta-llama/Meta-Llama-3-8B, meta-llama/Meta-Llama-3-70B and
mistralai/Mixtral-8x7B-v0.1. Token ids are the base models'; an Instruct checkpoint's
config.json (read by derta_jax.hf.config) supplies its own.
"""

from __future__ import annotations


from derta_jax.models.config import ModelConfig

_LLAMA3_COMMON = dict(family="llama", vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, num_kv_heads=8,
                      head_dim=128, bos_token_id=128000, eos_token_id=128001)

PRESETS: dict[str, ModelConfig] = {
    "mistral7b": ModelConfig(
        family="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=10000.0,
        max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096,
        bos_token_id=1, eos_token_id=2),
    "llama3_8b": ModelConfig(hidden_size=4096, intermediate_size=14336, num_layers=32,
                             num_heads=32, **_LLAMA3_COMMON),
    "llama3_70b": ModelConfig(hidden_size=8192, intermediate_size=28672, num_layers=80,
                              num_heads=64, **_LLAMA3_COMMON),
    "mixtral8x7b": ModelConfig(
        family="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6,
        max_position_embeddings=32768, rms_norm_eps=1e-5, num_experts=8,
        num_experts_per_tok=2, router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=2),
    # A small Llama for smoke tests and CPU runs: tied embeddings, GQA, llama3 rope scaling.
    "tiny": ModelConfig(
        family="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        max_position_embeddings=1024, tie_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=0),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name, with field overrides (e.g. scan_layers=True, dtype="bfloat16")."""
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r}: unknown preset (known: {sorted(PRESETS)})")
    return PRESETS[name].replace(**overrides).validate()
