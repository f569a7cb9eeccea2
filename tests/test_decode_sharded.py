"""Generation on a device mesh equals generation on one device, token for token.

The weights are loaded straight onto the trainer's shardings (derta_jax.weights.load_model
with a mesh), the rows and the KV cache are split over the batch axes and kv heads over
`tensor`; greedy decoding must not notice. Covers Llama, Mistral (sliding window 4, far
shorter than the prompts) and Mixtral (top-2 of 4 experts, dispatched per shard), a
left-padded batch of mixed lengths whose size the mesh does not divide, EOS and stop
strings ending rows at different steps."""

import jax
import numpy as np
import pytest

from derta_jax import weights
from derta_jax.models import decode
from derta_jax.train.mesh import make_mesh

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33, 34]]
MESHES = {"fsdp8": {"fsdp": 8}, "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}


class CharTokenizer:
    """Token i is the letter chr(ord('a') + i % 26): stop strings see real text."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def _generate(model, mesh, **options):
    return decode.generate(model, PROMPTS, max_new_tokens=12, mesh=mesh, **options)


@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral"])
def test_sharded_generation_equals_one_device(family, request):
    assert jax.device_count() == 8
    hf_dir = str(request.getfixturevalue(f"hf_tiny_{family}_dir"))
    single = weights.load_model(hf_dir).model
    free = _generate(single, None, eos_token_ids=[])
    assert len({tok for row in free.tokens for tok in row}) > 6  # real sequences
    # EOS: a token row 0 first emits at step >= 4 (the other rows end when they emit it)
    first = next(j for j, tok in enumerate(free.tokens[0]) if j >= 3 and tok not in free.tokens[0][:j])
    eos = free.tokens[0][first]
    # a stop string from the text of the row that runs longest before its EOS
    ends = [row.index(eos) if eos in row else len(row) for row in free.tokens[1:]]
    row, end = max(enumerate(ends, start=1), key=lambda pair: pair[1])
    assert end >= 3
    stop = CharTokenizer().decode(free.tokens[row][end - 2:end])
    # one compiled loop to the end (early exit on EOS), and loops of 3 tokens (stop strings)
    whole = _generate(single, None, eos_token_ids=[eos])
    chunked = _generate(single, None, eos_token_ids=[eos], tokenizer=CharTokenizer(),
                        stop_strings=[stop], check_every=3)
    assert whole.finish_reasons[0] == "eos" and chunked.finish_reasons[row] == "stop_string"
    assert whole.tokens[0] == free.tokens[0][:first + 1]

    for name, axes in MESHES.items():
        mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **axes})
        sharded = weights.load_model(hf_dir, mesh=mesh).model
        kernel = sharded.layers[0].attn.q_proj.kernel[...]
        assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
        out = _generate(sharded, mesh, eos_token_ids=[eos])
        assert (out.tokens, out.finish_reasons) == (whole.tokens, whole.finish_reasons), name
        out = _generate(sharded, mesh, eos_token_ids=[eos], tokenizer=CharTokenizer(),
                        stop_strings=[stop], check_every=3)
        assert (out.tokens, out.texts, out.finish_reasons) == (
            chunked.tokens, chunked.texts, chunked.finish_reasons), name


def test_kv_cache_is_split_over_rows_and_kv_heads(hf_tiny_llama_dir):
    from derta_jax.models.sharding import kv_cache_shardings

    model = weights.load_model(str(hf_tiny_llama_dir)).model
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2, "expert": 1})
    shardings = kv_cache_shardings(model.config, mesh, batch_size=4, max_len=16)
    assert tuple(shardings.k.spec) == (None, ("data", "fsdp"), "tensor", None, None)
    assert tuple(shardings.segment_ids.spec) == (("data", "fsdp"), None)
    # 3 rows do not split over 2 x 2 batch shards: the cache keeps them whole
    assert tuple(kv_cache_shardings(model.config, mesh, 3, 16).k.spec)[1] is None


def test_wider_padding_and_dummy_rows_change_nothing(hf_tiny_mistral_dir):
    """Prompts padded to a multiple of 16 (evaluation's bucketing) decode as padded to the
    longest prompt: padding has its own segment and never shifts RoPE positions. A batch
    padded with dummy rows (a short last batch, min_rows) decodes its real rows alike."""
    model = weights.load_model(str(hf_tiny_mistral_dir)).model
    narrow = decode.generate(model, PROMPTS, max_new_tokens=10, eos_token_ids=[])
    wide = decode.generate(model, PROMPTS, max_new_tokens=10, eos_token_ids=[], width_multiple=16)
    assert wide.tokens == narrow.tokens
    more = decode.generate(model, PROMPTS, max_new_tokens=10, eos_token_ids=[], min_rows=5)
    assert more.tokens == narrow.tokens and len(more.finish_reasons) == len(PROMPTS)
    ids, _, segments = decode.left_pad(PROMPTS, 0, width=16)
    assert ids.shape == (3, 16) and segments.sum() == sum(map(len, PROMPTS))
    np.testing.assert_array_equal(ids[1, -3:], PROMPTS[1])


def test_each_program_compiles_once_across_chunks_and_calls(hf_tiny_llama_dir):
    """Three calls of the loop per generate (loop_tokens=5 of 12): on one device the first
    generate adds at most one entry to each program's cache (the carry is placed as the loop
    returns it, so the 2nd and 3rd chunk reuse the 1st chunk's program), and on one device
    or a mesh a second generate adds none; the caller's key survives the loop's donation."""
    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1, "expert": 1})
    programs = (decode._empty_cache, decode.prefill, decode.decode_chunk)
    for where in (None, mesh):
        model = weights.load_model(str(hf_tiny_llama_dir), mesh=where).model
        key = jax.random.key(3)
        sizes, outputs = [[program._cache_size() for program in programs]], []
        for _ in range(2):
            outputs.append(decode.generate(model, PROMPTS, max_new_tokens=12, eos_token_ids=[],
                                           loop_tokens=5, mesh=where, rng=key,
                                           temperature=1.0).tokens)
            sizes.append([program._cache_size() for program in programs])
        if where is None:  # (none when an earlier test compiled the same shapes)
            assert all(after - before <= 1 for before, after in zip(sizes[0], sizes[1]))
        assert sizes[2] == sizes[1], where
        assert outputs[0] == outputs[1]  # same key, same samples
        jax.random.split(key)  # not deleted


@pytest.mark.parametrize("sizes", [{"data": 2, "fsdp": 2, "tensor": 2, "expert": 1},
                                   {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}])
def test_planner_counts_the_bytes_evaluation_places_on_each_device(hf_tiny_llama_dir, sizes):
    """plan --eval's weights and KV-cache bytes per device are the bytes of the arrays that
    loading and generate() actually place, device by device (a batch of 5 rows padded to
    the batch shards as generate pads it)."""
    from flax import nnx

    from derta_jax.train import plan_decode

    mesh = make_mesh(sizes)
    loaded = weights.load_model(str(hf_tiny_llama_dir), mesh=mesh)
    config = loaded.config
    shape = plan_decode.decode_shape(5, 16, 7, sizes)
    planned = plan_decode.decode_memory(config, mesh, shape)
    _, inputs = decode.batch_rows([[3] * 16] * 5, 0, mesh, 16)
    assert inputs[0].shape == (shape.rows, shape.prompt_len)
    shardings = decode.carry_shardings(config, mesh, shape.rows, shape.cache_len)
    with jax.set_mesh(mesh):
        cache = decode._empty_cache(config, shape.rows, shape.cache_len, shardings)

    def most_on_one_device(arrays):
        per_device = {}
        for array in arrays:
            for shard in array.addressable_shards:
                per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
        return max(per_device.values())

    assert most_on_one_device([cache.k, cache.v]) == planned["kv_cache_bytes"]
    params = jax.tree.leaves(nnx.state(loaded.model, nnx.Param))
    assert most_on_one_device(params) == planned["weights_bytes"]
