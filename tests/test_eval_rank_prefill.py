"""Rank-assisted prefilling (derta_jax/eval/rank_prefill.py): the rank rule against numpy,
the refusal-opening tokens, and `evaluate --suite=rank_prefill` against a slow reference
that runs transformers' model one full forward pass per chosen token."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from derta_jax.eval.rank_prefill import rank_prefill_items, refusal_opening_ids
from derta_jax.evaluate import main
from derta_jax.models.decode import rank_assisted_tokens
from tests.test_evaluate import ROWS, _prompts


def _slow_rank_choice(logits: np.ndarray, reference: int, k: int, banned: set) -> int:
    top = [int(i) for i in np.argsort(-logits, kind="stable")[:k]]
    if reference in top:
        return reference
    return next((t for t in top if t not in banned), top[0])


def test_rank_rule_takes_the_reference_in_the_top_k_else_the_best_unbanned():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    order = np.argsort(-logits, axis=1, kind="stable")
    reference = np.array([order[0, 2], order[1, 30], order[2, 0], order[3, 45], order[4, 4],
                          order[5, 10]], np.int32)
    banned = np.zeros(50, bool)
    banned[[order[1, 0], order[1, 1], order[3, 0]]] = True  # row 1: the 3rd best is allowed
    banned[order[5, :5]] = True  # row 5: every top-5 token banned -> the top one
    got = np.asarray(rank_assisted_tokens(jnp.asarray(logits), jnp.asarray(reference), 5,
                                          jnp.asarray(banned)))
    want = [_slow_rank_choice(logits[r], int(reference[r]), 5, set(np.flatnonzero(banned)))
            for r in range(6)]
    assert got.tolist() == want
    assert want[0] == reference[0] and want[1] == order[1, 2] and want[5] == order[5, 0]


def test_refusal_opening_tokens(small_tokenizer):
    banned = set(refusal_opening_ids(small_tokenizer))
    vocab = small_tokenizer.get_vocab()
    texts = {small_tokenizer.decode([i]).strip(): i for i in vocab.values()}
    for text in ("Sorry", "I", "S"):  # a whole opening, and tokens that may begin one
        if text in texts:
            assert texts[text] in banned, text
    for text in ("the", "Step", "door", "1"):
        if text in texts:
            assert texts[text] not in banned, text
    assert "Sorry" in texts and "the" in texts  # the checks above did run


def test_evaluate_rank_prefill_equals_a_token_by_token_reference(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from derta_jax.data.templates import make_template
    from derta_jax.eval.run import encode_prompt

    prompts = _prompts(tmp_path / "p.jsonl", ROWS[:2])
    rank_k, depths, new = 40, (0, 3, 6), 5
    assert main(["--model", tiny_model_dir, "--suite", "rank_prefill", "--prompts", prompts,
                 "--prefill_depths", ",".join(map(str, depths)), "--rank_k", str(rank_k),
                 "--max_new_tokens", str(new), "--batch_size", "2",
                 "--out", str(tmp_path / "o")]) == 0
    rows = [json.loads(line) for line in
            (tmp_path / "o" / "generations.jsonl").read_text().splitlines()]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    template = make_template("chat", tokenizer)
    banned = set(refusal_opening_ids(tokenizer)) | {tokenizer.eos_token_id}
    expected, kept = {}, []
    for row in ROWS[:2]:
        ids = encode_prompt(tokenizer, template.render(row["question"]))
        reference = tokenizer.encode(row["harmful_response"], add_special_tokens=False)
        chosen = []
        with torch.no_grad():
            for t in range(min(max(depths), len(reference))):
                logits = hf(torch.tensor([ids + chosen])).logits[0, -1].numpy()
                chosen.append(_slow_rank_choice(logits, reference[t], rank_k, banned))
        kept.append(sum(a == b for a, b in zip(chosen, reference)))
        for k in depths:
            prompt = ids + chosen[:k]
            with torch.no_grad():
                out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
            continuation = out[0, len(prompt):].tolist()
            if tokenizer.eos_token_id in continuation:
                continuation = continuation[:continuation.index(tokenizer.eos_token_id)]
            expected[(row["question"], k)] = (prompt, tokenizer.decode(chosen[:k]),
                                              tokenizer.decode(continuation,
                                                               skip_special_tokens=True))
    assert 0 < sum(kept) < 2 * max(depths)  # both the reference and substitutes were fed
    assert len(rows) == len(expected)
    for row in rows:
        prompt, prefill, generation = expected[(row["question"], row["k"])]
        assert row["suite"] == "rank_prefill"
        assert row["prompt_ids"] == prompt and row["prefill"] == prefill
        assert row["generation"] == generation, (row["question"], row["k"])
        assert row["meta"]["rank_k"] == rank_k
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert sorted(g["k"] for g in report["groups"]
                  if g["suite"] == "rank_prefill" and g["held_out"] is None) == list(depths)
    assert (tmp_path / "o" / "asr_vs_rank_prefill.png").exists()


def test_rank_prefill_items_need_depths_and_a_positive_k(small_tokenizer):
    with pytest.raises(ValueError, match="rank_k=0 must be >= 1"):
        rank_prefill_items(None, small_tokenizer, [], None, depths=(0, 5), rank_k=0)
    with pytest.raises(ValueError, match="need depths >= 0"):
        rank_prefill_items(None, small_tokenizer, [], None, depths=())


def test_forcing_holds_across_several_calls_of_the_decode_loop(hf_tiny_llama_dir):
    """The forced step index carries over from one compiled loop call to the next: the
    tokens are those of one call (loop_tokens=2 makes four calls for 7 tokens)."""
    from derta_jax import weights
    from derta_jax.models import decode

    model = weights.load_model(str(hf_tiny_llama_dir)).model
    prompts = [[5, 6, 7, 8], [20, 21]]
    forced = [[40, 41, 42, 43, 44], [50, 51, 52]]
    free = decode.generate(model, prompts, max_new_tokens=7, eos_token_ids=[])
    vocab = model.config.vocab_size
    # every token ranks in the top `vocab`: the references are fed; with k=8 and the free
    # run's tokens banned, the substitutes are second choices
    for rank_k, banned in ((vocab, []), (8, sorted({t for row in free.tokens for t in row}))):
        options = dict(max_new_tokens=7, eos_token_ids=[], forced=forced, rank_k=rank_k,
                       banned_ids=banned)
        whole = decode.generate(model, prompts, **options)
        chunked = decode.generate(model, prompts, loop_tokens=2, **options)
        assert chunked.tokens == whole.tokens, rank_k
        if rank_k == vocab:
            assert [row[:len(f)] for row, f in zip(whole.tokens, forced)] == forced
        else:
            assert all(whole.tokens[r][t] != free.tokens[r][t] and whole.tokens[r][t] not in banned
                       for r in range(2) for t in range(len(forced[r])))
