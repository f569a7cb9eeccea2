"""A small TFDS data set for the data.sources tests: the synthetic world's triples and
helpful files (the sizes of tests/test_train_e2e.py's MICRO config), a BPE tokenizer
trained on the world, and derta_mixture/derta built from the files by the command."""

from __future__ import annotations

import pytest

from derta_jax.data import synthetic, tfds_build
from derta_jax.data.tokenizer_builder import build_bpe_tokenizer, save_tokenizer

NUM_TRIPLES, NUM_HELPFUL, NUM_SAFETY = 40, 80, 40
VOCAB_SIZE = 1024  # tiny_config's model.vocab_size


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """{triples, helpful, tokenizer, data_dir}: paths of the files, the tokenizer directory
    and the TFDS data_dir holding derta_mixture/derta:1.0.0."""
    root = tmp_path_factory.mktemp("world")
    synthetic.write_world(str(root / "w"), 0, num_triples=NUM_TRIPLES, num_helpful=NUM_HELPFUL)
    world = synthetic.generate_world(0, num_triples=NUM_TRIPLES, num_helpful=NUM_HELPFUL)
    required = synthetic.single_token_strings()
    tok = build_bpe_tokenizer(synthetic.training_texts(world),
                              vocab_size=VOCAB_SIZE - len(required), required_words=required)
    save_tokenizer(tok, str(root / "tok"))
    files = {"triples": str(root / "w" / "triples.jsonl"),
             "helpful": str(root / "w" / "helpful.jsonl"), "tokenizer": str(root / "tok"),
             "data_dir": str(root / "tfds")}
    status = tfds_build.main(["tfds_build", f"--triples={files['triples']}",
                              f"--helpful={files['helpful']}", "--recipe=derta", "--seed=0",
                              f"--num_safety={NUM_SAFETY}", f"--data_dir={files['data_dir']}"])
    assert status == 0
    return files
