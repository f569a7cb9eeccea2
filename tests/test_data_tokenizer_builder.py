"""The small BPE tokenizer builder: the refusal word is one token, save/load is safe."""

import os

import pytest

from derta_jax.data import tokenize
from derta_jax.data.tokenizer_builder import build_bpe_tokenizer, load_tokenizer, save_tokenizer


def test_refusal_word_is_one_token_even_when_the_corpus_never_says_it(tmp_path):
    tok = build_bpe_tokenizer(["the cat sat on the mat", "a dog ran far away"] * 5, vocab_size=300,
                              required_words=("Sorry", "Nope"))
    for word in ("Sorry", "Nope"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1
    assert tokenize.refusal_token_id(tok) == tok.convert_tokens_to_ids("Sorry")
    text = "Sorry, the cat sat. Nope!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok(text)["input_ids"][0] == tok.bos_token_id  # adds its BOS like Llama-3
    save_tokenizer(tok, str(tmp_path / "tok"))
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.chat_template == tok.chat_template and loaded.eos_token == "<|eos|>"


def test_save_refuses_a_non_empty_directory_and_load_needs_one(tmp_path):
    tok = build_bpe_tokenizer(["some words here"] * 3, vocab_size=280)
    (tmp_path / "mine.txt").write_text("user file")
    with pytest.raises(FileExistsError, match=f"{tmp_path} exists and is not empty; pass --overwrite"):
        save_tokenizer(tok, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["mine.txt"]
    with pytest.raises(FileNotFoundError, match=f"tokenizer directory {tmp_path / 'nope'} does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
