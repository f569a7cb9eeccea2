"""Model FLOPs per token and known peak FLOP/s, for MFU (training logs, benchmarks, planner).

FLOPs follow the usual accounting (Kaplan et al.; PaLM appendix B): a matmul with N
weights costs 2N FLOPs per token forward and 4N backward; attention scores and values add
4 * T * H * Hd per layer forward (causal masking is not discounted, as in PaLM). A frozen
LoRA base still runs forward and back-propagates to its inputs (4N), but computes no weight
gradient (saves 2N). MoE counts only the top-k experts a token visits.
"""

from __future__ import annotations

from derta_jax.models.config import ModelConfig

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "h100": 989e12,  # SXM; jax names the PCIe card "NVIDIA H100 PCIe"
    "h100 pcie": 756e12,
    "h200": 989e12,
    "a100": 312e12,
}


GIB = 2**30
GB = 10**9

# Memory per device (a TPU chip, a GPU): Google's HBM figures per chip (GiB), NVIDIA's per
# GPU (decimal GB, as sold; the runtime sees a little less). Keys match like PEAK_FLOPS;
# "a100 40gb" needs both words ("NVIDIA A100-SXM4-40GB").
HBM_BYTES = {
    "tpu v4": 32 * GIB,
    "tpu v5 lite": 16 * GIB,
    "tpu v5e": 16 * GIB,
    "tpu v5p": 95 * GIB,
    "tpu v5": 95 * GIB,
    "tpu v6 lite": 32 * GIB,
    "tpu v6e": 32 * GIB,
    "h100": 80 * GB,
    "h200": 141 * GB,
    "a100": 80 * GB,
    "a100 40gb": 40 * GB,
}


def hbm_bytes_for(device_kind: str) -> int:
    """Memory per device of a jax device_kind string (0 when unknown, e.g. a CPU). The key
    with the most words all present in the kind wins, so "A100-SXM4-40GB" is the 40 GB card."""
    words = device_kind.lower().replace("-", " ").replace("_", " ").split()
    best, best_words = 0, 0
    for name, size in HBM_BYTES.items():
        parts = name.split()
        if all(p in words for p in parts) and len(parts) > best_words:
            best, best_words = size, len(parts)
    return best


def peak_flops_for(device_kind: str) -> float:
    """Peak FLOP/s of a jax device_kind string (0.0 when unknown, e.g. a CPU)."""
    kind = device_kind.lower()
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name in kind:
            return PEAK_FLOPS[name]
    return 0.0


def matmul_params_per_token(cfg: ModelConfig) -> tuple[int, int]:
    """(decoder-layer weights a token multiplies through, unembedding weights D x V).

    The embedding lookup costs no FLOPs; a MoE token visits only its top-k experts."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = d * hd * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
    experts = cfg.num_experts_per_tok if cfg.is_moe else 1
    mlp = 3 * d * f * experts + (d * cfg.num_experts if cfg.is_moe else 0)
    return cfg.num_layers * (attn + mlp), d * cfg.vocab_size


def training_flops_per_token(cfg: ModelConfig, seq_len: int, lora: bool = False,
                             lora_rank: int = 0) -> float:
    layers, unembed = matmul_params_per_token(cfg)
    n = layers + unembed
    attention = 4 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim  # forward
    if not lora:
        return 6.0 * n + 3.0 * attention
    d, hd = cfg.hidden_size, cfg.head_dim
    per_layer_adapters = lora_rank * (
        (d + cfg.num_heads * hd) * 2 + (d + cfg.num_kv_heads * hd) * 2
        + (d + cfg.intermediate_size) * 3 * (cfg.num_experts_per_tok if cfg.is_moe else 1))
    return 4.0 * n + 3.0 * attention + 6.0 * cfg.num_layers * per_layer_adapters
