"""KV-cache decoding: cached steps equal the full forward, greedy generation equals
Hugging Face `generate(do_sample=False)`, sampling and stopping behave as specified."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from derta_jax.models import decode
from derta_jax.models.attention import init_kv_cache
from tests.fixtures_hf import hf_torch_model, jax_model_from_hf_dir

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34]]


@pytest.fixture
def hf_dir(request):
    return request.getfixturevalue(f"hf_tiny_{request.param}_dir")


def hf_greedy(hf_dir, prompts, max_new_tokens, eos_token_id):
    """HF generate on the same left-padded batch; rows cut after their first EOS."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf_torch_model(hf_dir).generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                          max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                          pad_token_id=0)
    rows = out[:, width:].tolist()
    if eos_token_id is not None:
        rows = [row[:row.index(eos_token_id) + 1] if eos_token_id in row else row for row in rows]
    return rows


@pytest.mark.parametrize("hf_dir", ["llama", "mistral", "mixtral"], indirect=True)
def test_greedy_generation_equals_hf_generate(hf_dir):
    model, _ = jax_model_from_hf_dir(hf_dir)
    ours = decode.generate(model, PROMPTS, max_new_tokens=16, eos_token_ids=[])
    reference = hf_greedy(hf_dir, PROMPTS, 16, None)
    assert ours.tokens == reference
    assert ours.finish_reasons == ["length"] * 3
    assert len({tok for row in reference for tok in row}) > 8  # not one token repeated

    # Stop on EOS: take a token row 0 produces at step 5 as the EOS id; rows that emit it
    # stop there (EOS included), the others run to the length limit, exactly as in HF.
    eos = reference[0][5]
    ours = decode.generate(model, PROMPTS, max_new_tokens=16, eos_token_ids=[eos])
    assert ours.tokens == hf_greedy(hf_dir, PROMPTS, 16, eos)
    assert ours.tokens[0][-1] == eos and ours.finish_reasons[0] == "eos"
    for row, reason in zip(ours.tokens, ours.finish_reasons):
        assert reason == ("eos" if eos in row else "length")


@pytest.mark.parametrize("family,scan_layers", [("llama", False), ("mistral", True)])
def test_cached_decode_equals_full_forward(family, scan_layers, request):
    """Prefill a left-padded batch, then feed tokens one at a time: every step's logits
    equal those of a full forward over the whole sequence (Mistral: the sequence is
    longer than its sliding window, so the cache path must apply the window too)."""
    hf_dir = request.getfixturevalue(f"hf_tiny_{family}_dir")
    model, config = jax_model_from_hf_dir(hf_dir, scan_layers=scan_layers)
    rng = np.random.default_rng(0)
    extra = rng.integers(3, config.vocab_size, (3, 6))  # tokens fed one by one
    ids, positions, segments = decode.left_pad(PROMPTS, pad_id=0)
    full_ids = np.concatenate([ids, extra], axis=1)
    full_positions = np.concatenate([positions, positions[:, -1:] + 1 + np.arange(6)], axis=1)
    full_segments = np.concatenate([segments, np.ones((3, 6), np.int32)], axis=1)
    forward = nnx.jit(lambda m, i, p, s: m.logits(m(i, p, s)[0]))
    full = np.asarray(forward(model, jnp.asarray(full_ids), jnp.asarray(full_positions),
                              jnp.asarray(full_segments)))

    cache = init_kv_cache(config, batch_size=3, max_len=full_ids.shape[1])
    step = nnx.jit(lambda m, i, p, s, c: (lambda h, a, c: (m.logits(h), c))(
        *m.forward_with_cache(i, p, s, c)))
    logits, cache = step(model, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(segments), cache)
    real = segments.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, :ids.shape[1]][real], atol=1e-4)
    for t in range(6):
        col = ids.shape[1] + t
        logits, cache = step(model, jnp.asarray(full_ids[:, col:col + 1]),
                             jnp.asarray(full_positions[:, col:col + 1]), jnp.ones((3, 1), jnp.int32),
                             cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, col], atol=1e-4)
    assert int(cache.index) == full_ids.shape[1]


def test_left_pad_positions_and_segments():
    ids, positions, segments = decode.left_pad([[7, 8, 9], [4]], pad_id=0)
    np.testing.assert_array_equal(ids, [[7, 8, 9], [0, 0, 4]])
    np.testing.assert_array_equal(positions, [[0, 1, 2], [0, 0, 0]])
    np.testing.assert_array_equal(segments, [[1, 1, 1], [0, 0, 1]])
    with pytest.raises(ValueError, match="^generate: every prompt needs at least one token$"):
        decode.left_pad([[1], []], pad_id=0)


def _nucleus_reference(logits_row, temperature, top_p):
    """Slow reference: the smallest set of most likely tokens whose mass reaches top_p."""
    probs = np.exp((logits_row - logits_row.max()) / temperature)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    kept, mass = [], 0.0
    for token in order:
        kept.append(int(token))
        mass += probs[token]
        if mass >= top_p:
            break
    return set(kept), probs


def test_sampling_follows_temperature_and_top_p():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 12)) * 2, jnp.float32)
    greedy = decode.sample_tokens(logits, jax.random.key(0), 0.0, 1.0)
    assert int(greedy[0]) == int(np.argmax(logits[0]))

    draws = 20000
    keys = jax.random.split(jax.random.key(1), draws)
    sample = jax.vmap(lambda k: decode.sample_tokens(logits, k, 0.7, 1.0)[0])(keys)
    _, probs = _nucleus_reference(np.asarray(logits[0]), 0.7, 1.0)
    frequencies = np.bincount(np.asarray(sample), minlength=12) / draws
    np.testing.assert_allclose(frequencies, probs, atol=0.015)

    nucleus, probs = _nucleus_reference(np.asarray(logits[0]), 1.0, 0.8)
    sample = jax.vmap(lambda k: decode.sample_tokens(logits, k, 1.0, 0.8)[0])(keys)
    assert set(np.asarray(sample).tolist()) == nucleus
    renormalised = np.zeros(12)
    renormalised[list(nucleus)] = probs[list(nucleus)] / probs[list(nucleus)].sum()
    np.testing.assert_allclose(np.bincount(np.asarray(sample), minlength=12) / draws, renormalised,
                               atol=0.015)


class CharTokenizer:
    """A toy tokenizer: token i is the letter chr(ord('a') + i % 26)."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_and_text_prompts(hf_tiny_mistral_dir):
    model, _ = jax_model_from_hf_dir(hf_tiny_mistral_dir)
    tok = CharTokenizer()
    free = decode.generate(model, ["abcdefg", "hij"], tokenizer=tok, max_new_tokens=12, eos_token_ids=[])
    assert free.tokens == decode.generate(model, [tok.encode("abcdefg"), tok.encode("hij")],
                                          max_new_tokens=12, eos_token_ids=[]).tokens
    assert free.texts == [tok.decode(row) for row in free.tokens]
    stop = free.texts[0][4:6]  # the text of row 0's 5th and 6th tokens
    first = free.texts[0].find(stop)
    out = decode.generate(model, ["abcdefg", "hij"], tokenizer=tok, max_new_tokens=12,
                          eos_token_ids=[], stop_strings=[stop], check_every=5)
    assert out.finish_reasons[0] == "stop_string"
    assert out.tokens[0] == free.tokens[0][:first + 2]
    assert out.texts[0] == free.texts[0][:first]
    if stop in free.texts[1]:
        assert out.finish_reasons[1] == "stop_string"
    else:
        assert out.tokens[1] == free.tokens[1] and out.finish_reasons[1] == "length"


def test_generate_rejects_bad_arguments(hf_tiny_mistral_dir):
    model, _ = jax_model_from_hf_dir(hf_tiny_mistral_dir)
    with pytest.raises(ValueError, match="^generate: text prompts need a tokenizer$"):
        decode.generate(model, ["hello"])
    with pytest.raises(ValueError, match="^generate: stop_strings need a tokenizer"):
        decode.generate(model, [[1, 2]], stop_strings=["x"])
    with pytest.raises(ValueError, match=r"^generate: need temperature >= 0 and 0 < top_p <= 1, "
                                         r"got temperature=1.0, top_p=0.0$"):
        decode.generate(model, [[1, 2]], temperature=1.0, top_p=0.0)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decode_loop_writes_the_cache_in_place(hf_tiny_llama_dir, scan_layers):
    """The compiled decode loop neither copies nor transposes the KV cache: each layer
    writes its new slots into the whole cache, and attention reads the cache in its own
    layout (a cache sliced and re-stacked per layer was copied about six times a token)."""
    import re

    model, config = jax_model_from_hf_dir(hf_tiny_llama_dir, scan_layers=scan_layers)
    graphdef, state = nnx.split(model)
    rows, length = 4, 64
    cache = init_kv_cache(config, rows, length)
    carry = decode.DecodeCarry(cache, jnp.zeros((rows, config.vocab_size), jnp.float32),
                               jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), bool),
                               jax.random.key(0))
    hlo = decode.decode_chunk.lower(graphdef, state, carry, jnp.asarray(8, jnp.int32), 8, 0.0,
                                    1.0, None, jnp.zeros((1,), jnp.int32)).compile().as_text()
    layer_slots = rows * config.num_kv_heads * length * config.head_dim
    moved = []
    for shape, op in re.findall(r"= \w+\[([\d,]*)\]\S* (copy|transpose|concatenate)\(", hlo):
        if shape and np.prod([int(d) for d in shape.split(",")]) >= layer_slots:
            moved.append((shape, op))
    assert not moved, moved
    assert re.search(r"dynamic-update-slice", hlo)  # the writes are there
