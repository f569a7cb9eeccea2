"""Safetensors streaming reader / sharded writer: round trips, interop with the safetensors
library and transformers' layout, and one clear error per kind of bad input."""

import json
import os
import re

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from derta_jax.hf import peft
from derta_jax.hf import safetensors_io as sio


def _random_tensors(seed=0):
    rng = np.random.default_rng(seed)
    return [
        ("model.embed_tokens.weight", rng.standard_normal((64, 32)).astype(np.float32)),
        ("model.layers.0.self_attn.q_proj.weight",
         rng.standard_normal((32, 32)).astype(ml_dtypes.bfloat16)),
        ("model.layers.0.mlp.up_proj.weight", rng.standard_normal((48, 32)).astype(np.float32)),
        ("model.layers.0.input_layernorm.weight", rng.standard_normal(32).astype(ml_dtypes.bfloat16)),
        ("model.layers.1.mlp.down_proj.weight", rng.standard_normal((32, 48)).astype(np.float16)),
        ("model.norm.weight", rng.standard_normal(32).astype(np.float32)),
        ("some.int.buffer", rng.integers(-5, 5, size=(7,)).astype(np.int32)),
        ("scalar", np.array(3.5, dtype=np.float32)),
    ]


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


def _raw_file(path, header, data=b"", pad=True):
    """Writes a safetensors file with an arbitrary (possibly wrong) header."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded + data)


def test_sharded_round_trip_is_bit_identical_with_transformers_layout(tmp_path):
    tensors = _random_tensors()
    files = sio.write_safetensors_sharded(tensors, tmp_path / "out", max_shard_bytes=5000)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", f) for f in shards)
    index = json.loads((tmp_path / "out" / sio.INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for _, a in tensors)
    assert index["metadata"]["total_parameters"] == sum(a.size for _, a in tensors)
    assert set(index["weight_map"]) == {n for n, _ in tensors}
    for name, filename in index["weight_map"].items():
        entries, meta = sio.read_safetensors_header(tmp_path / "out" / filename)
        assert name in entries and meta["format"] == "pt"
    # no shard holds more than the limit unless it is a single oversized tensor
    for f in shards:
        entries, _ = sio.read_safetensors_header(tmp_path / "out" / f)
        assert sum(e.nbytes for e in entries.values()) <= 5000 or len(entries) == 1

    seen = {}
    for name, array, source in sio.iter_checkpoint(tmp_path / "out"):
        assert os.path.basename(source) == index["weight_map"][name]
        seen[name] = array
    expected = dict(tensors)
    assert seen.keys() == expected.keys()
    for name, array in expected.items():
        assert seen[name].dtype == array.dtype and seen[name].shape == array.shape, name
        assert _bits(seen[name]) == _bits(array), name


def test_tensors_are_aligned_and_read_by_the_safetensors_library(tmp_path):
    tensors = _random_tensors(1)
    sio.write_safetensors_sharded(tensors, tmp_path, max_shard_bytes=10**9)
    assert sorted(os.listdir(tmp_path)) == [sio.SINGLE_FILE]  # one shard: no index, as HF
    entries, _ = sio.read_safetensors_header(tmp_path / sio.SINGLE_FILE)
    assert all(e.begin % e.dtype.itemsize == 0 for e in entries.values())
    loaded = torch_load_file(tmp_path / sio.SINGLE_FILE)
    for name, array in tensors:
        t = loaded[name]
        if array.dtype == ml_dtypes.bfloat16:
            assert t.dtype == torch.bfloat16
            np.testing.assert_array_equal(t.view(torch.int16).numpy(), array.view(np.int16))
        else:
            np.testing.assert_array_equal(t.numpy(), array)


def test_reads_files_written_by_the_safetensors_library(tmp_path):
    torch.manual_seed(0)
    ref = {"a": torch.randn(5, 3, dtype=torch.bfloat16), "b": torch.randn(4),
           "c": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    torch_save_file(ref, tmp_path / sio.SINGLE_FILE, metadata={"format": "pt"})
    got = {n: a for n, a, _ in sio.iter_checkpoint(tmp_path)}
    np.testing.assert_array_equal(got["a"].view(np.int16), ref["a"].view(torch.int16).numpy())
    np.testing.assert_array_equal(got["b"], ref["b"].numpy())
    np.testing.assert_array_equal(got["c"], ref["c"].numpy())


def test_views_are_read_only_memory_maps_and_casts_match_numpy(tmp_path):
    tensors = _random_tensors(2)
    sio.write_safetensors_sharded([t for t in tensors if t[1].dtype.kind == "f" or
                                   t[1].dtype == ml_dtypes.bfloat16], tmp_path, 10**9)
    for name, array, _ in sio.iter_checkpoint(tmp_path):
        assert not array.flags.writeable and not array.flags.owndata, name
    expected = {n: a for n, a in tensors}
    for name, array, _ in sio.iter_checkpoint(tmp_path, dtype="bfloat16"):
        assert array.dtype == ml_dtypes.bfloat16
        assert _bits(array) == _bits(expected[name].astype(ml_dtypes.bfloat16)), name


def test_oversized_tensor_gets_its_own_shard(tmp_path):
    big = np.ones((100, 100), np.float32)
    small = np.ones(10, np.float32)
    files = sio.write_safetensors_sharded([("s1", small), ("big", big), ("s2", small)],
                                          tmp_path, max_shard_bytes=1000)
    index = json.loads((tmp_path / sio.INDEX_FILE).read_text())["weight_map"]
    assert len(files) == 4  # three shards + index
    assert len({index["s1"], index["big"], index["s2"]}) == 3


def test_writer_refuses_non_empty_dir_and_overwrite_removes_only_stale_weights(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path} exists and is not empty")):
        sio.write_safetensors_sharded([("a", np.ones(3, np.float32))], tmp_path)
    sio.write_safetensors_sharded([(f"t{i}", np.ones(100, np.float32)) for i in range(5)],
                                  tmp_path, 400, overwrite=True)
    assert len([f for f in os.listdir(tmp_path) if sio.SHARD_PATTERN.fullmatch(f)]) == 5
    sio.write_safetensors_sharded([("a", np.ones(3, np.float32))], tmp_path, 400, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_writer_rejects_duplicate_names_and_unknown_dtypes(tmp_path):
    with pytest.raises(sio.SafetensorsError, match="duplicate tensor name 'a'"):
        sio.write_safetensors_sharded([("a", np.ones(3)), ("a", np.ones(3))], tmp_path / "x")
    with pytest.raises(sio.SafetensorsError, match="tensor 'c': dtype complex64 has no safetensors"):
        sio.write_safetensors_sharded([("c", np.ones(3, np.complex64))], tmp_path / "y")


def test_parse_size():
    assert sio.parse_size("5GB") == 5 * 10**9
    assert sio.parse_size("500MiB") == 500 * 2**20
    assert sio.parse_size("1.5kb") == 1500
    assert sio.parse_size(77) == 77
    with pytest.raises(ValueError, match=re.escape("max_shard_size='5 parsecs'")):
        sio.parse_size("5 parsecs")


# ----------------------------------------------------------------------------- bad input


def _sharded(tmp_path):
    tensors = [(f"w{i}", np.full((4, 4), i, np.float32)) for i in range(4)]
    sio.write_safetensors_sharded(tensors, tmp_path, max_shard_bytes=64)
    return json.loads((tmp_path / sio.INDEX_FILE).read_text())


def test_truncated_shard_names_tensor_and_file(tmp_path):
    index = _sharded(tmp_path)
    shard = tmp_path / index["weight_map"]["w2"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(sio.SafetensorsError,
                       match=re.escape(f"{shard}: tensor 'w2': truncated file: data_offsets [0, 64]")):
        list(sio.iter_checkpoint(tmp_path))


def test_truncated_header_names_file(tmp_path):
    _raw_file(tmp_path / sio.SINGLE_FILE, b'{"a": {"dtype": "F32"')
    path = tmp_path / sio.SINGLE_FILE
    path.write_bytes(path.read_bytes()[:12])
    with pytest.raises(sio.SafetensorsError, match=re.escape(f"{path}: truncated file: header of")):
        sio.scan_checkpoint(tmp_path)


def test_index_naming_a_missing_file(tmp_path):
    index = _sharded(tmp_path)
    missing = index["weight_map"]["w1"]
    os.remove(tmp_path / missing)
    with pytest.raises(sio.SafetensorsError, match=re.escape(
            f"{tmp_path / sio.INDEX_FILE}: weight_map names file {missing!r} (for tensor 'w1') "
            f"but {tmp_path / missing} does not exist")):
        sio.scan_checkpoint(tmp_path)


def test_tensor_in_index_absent_from_its_shard(tmp_path):
    index = _sharded(tmp_path)
    index["weight_map"]["ghost"] = index["weight_map"]["w0"]
    (tmp_path / sio.INDEX_FILE).write_text(json.dumps(index))
    shard = tmp_path / index["weight_map"]["w0"]
    with pytest.raises(sio.SafetensorsError, match=re.escape(
            f"{shard}: tensor 'ghost' is listed in {tmp_path / sio.INDEX_FILE} but absent")):
        sio.scan_checkpoint(tmp_path)


def test_duplicate_tensor_across_shards(tmp_path):
    index = _sharded(tmp_path)
    victim = tmp_path / index["weight_map"]["w3"]
    sio.write_safetensors_file(victim, [("w3", np.ones((4, 4), np.float32)),
                                        ("w0", np.ones((4, 4), np.float32))])
    with pytest.raises(sio.SafetensorsError, match=re.escape(
            f"{victim}: duplicate or unindexed tensor 'w0' (assigned to "
            f"{index['weight_map']['w0']!r} by the index)")):
        sio.scan_checkpoint(tmp_path)


def test_duplicate_tensor_inside_one_header(tmp_path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    _raw_file(tmp_path / sio.SINGLE_FILE, f'{{"x": {entry}, "x": {entry}}}'.encode(), b"\0" * 4)
    with pytest.raises(sio.SafetensorsError, match=re.escape(
            f"{tmp_path / sio.SINGLE_FILE}: duplicate tensor name 'x' in the header")):
        sio.scan_checkpoint(tmp_path)


def test_unsupported_dtype(tmp_path):
    _raw_file(tmp_path / sio.SINGLE_FILE,
              {"q": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(sio.SafetensorsError, match=re.escape(
            f"{tmp_path / sio.SINGLE_FILE}: tensor 'q': unsupported dtype 'C64'")):
        sio.scan_checkpoint(tmp_path)


@pytest.mark.parametrize("entry, message", [
    # a JSON list or object as the dtype was `TypeError: unhashable type` (issue 11)
    ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, "unsupported dtype ['F32']"),
    ({"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}, "unsupported dtype {'F32': 1}"),
    ({"dtype": 4, "shape": [1], "data_offsets": [0, 4]}, "unsupported dtype 4"),
    ({"dtype": "F32", "shape": {"0": 1}, "data_offsets": [0, 4]},
     "shape {'0': 1} must be a list of non-negative integers"),
    ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
     "shape [True] must be a list of non-negative integers"),
    ({"dtype": "F32", "shape": [1], "data_offsets": {"begin": 0, "end": 4}},
     "data_offsets {'begin': 0, 'end': 4} must be [begin, end] with 0 <= begin <= end"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [[0], [4]]},
     "data_offsets [[0], [4]] must be [begin, end] with 0 <= begin <= end"),
])
def test_header_values_of_the_wrong_json_type_name_the_file(tmp_path, entry, message):
    _raw_file(tmp_path / sio.SINGLE_FILE, {"q": entry}, b"\0" * 4)
    with pytest.raises(sio.SafetensorsError, match=re.escape(
            f"{tmp_path / sio.SINGLE_FILE}: tensor 'q': {message}")):
        sio.scan_checkpoint(tmp_path)


@pytest.mark.parametrize("header, message", [
    (b'{"__metadata__": {"format": 1}}', "__metadata__ must be an object of strings, got "
                                         "{'format': 1}"),
    (b'{"__metadata__": ["pt"]}', "__metadata__ must be an object of strings, got ['pt']"),
    (b"[" * 50_000 + b"]" * 50_000, "header is not valid JSON (maximum recursion depth"),
    (b'{"x": ' + b"7" * 5000 + b"}", "header is not valid JSON (Exceeds the limit"),
    (b'{"x": "\xff"}', "header is not valid JSON ('utf-8' codec can't decode"),
])
def test_header_that_python_cannot_take_as_json_names_the_file(tmp_path, header, message):
    _raw_file(tmp_path / sio.SINGLE_FILE, header)
    with pytest.raises(sio.SafetensorsError, match=re.escape(
            f"{tmp_path / sio.SINGLE_FILE}: {message}")):
        sio.scan_checkpoint(tmp_path)


@pytest.mark.parametrize("index, message", [
    (b'{"weight_map": {"w0": ["a.safetensors"]}}',
     "tensor 'w0': shard file name ['a.safetensors'] must be a plain file name"),
    (b'{"weight_map": {"w0": {"f": 1}, "w1": "x.safetensors"}}',
     "tensor 'w0': shard file name {'f': 1} must be a plain file name"),
    (b'{"weight_map": {"w0": 3, "w1": "x.safetensors"}}',
     "tensor 'w0': shard file name 3 must be a plain file name"),
    (b'{"weight_map": {"w0": "\xc0.safetensors"}}', "the index is not valid JSON ('utf-8'"),
])
def test_index_of_the_wrong_json_types_names_the_index(tmp_path, index, message):
    _sharded(tmp_path)
    (tmp_path / sio.INDEX_FILE).write_bytes(index)
    with pytest.raises(sio.SafetensorsError, match=re.escape(
            f"{tmp_path / sio.INDEX_FILE}: {message}")):
        sio.scan_checkpoint(tmp_path)


def test_dtype_that_cannot_be_cast_fails_before_any_tensor_is_yielded(tmp_path):
    sio.write_safetensors_sharded([("a_float", np.ones(2, np.float32)),
                                   ("ids", np.arange(3, dtype=np.int64))], tmp_path, 10**6)
    stream = sio.iter_checkpoint(tmp_path, dtype="bfloat16")
    with pytest.raises(sio.SafetensorsError, match=re.escape(
            f"{tmp_path / sio.SINGLE_FILE}: tensor 'ids' of dtype I64 cannot be cast to bfloat16")):
        next(stream)


def test_offsets_that_disagree_with_shape(tmp_path):
    _raw_file(tmp_path / sio.SINGLE_FILE,
              {"m": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, b"\0" * 24)
    with pytest.raises(sio.SafetensorsError, match=re.escape(
            "tensor 'm': data_offsets [0, 20] hold 20 bytes but shape [2, 3] of F32 needs 24")):
        sio.scan_checkpoint(tmp_path)


def test_index_cannot_escape_the_directory(tmp_path):
    _sharded(tmp_path)
    (tmp_path / sio.INDEX_FILE).write_text(json.dumps({"weight_map": {"w0": "../evil.safetensors"}}))
    with pytest.raises(sio.SafetensorsError, match="must be a plain file name"):
        sio.scan_checkpoint(tmp_path)


def test_directory_without_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(sio.SafetensorsError, match=re.escape(
            f"{tmp_path}: no model.safetensors or model.safetensors.index.json found")):
        sio.scan_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- PEFT adapter


def test_peft_adapter_files_and_validation(tmp_path):
    r = 4
    rng = np.random.default_rng(0)
    base = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = [(f"{base}.lora_A.weight", rng.standard_normal((r, 16)).astype(np.float32)),
               (f"{base}.lora_B.weight", rng.standard_normal((24, r)).astype(np.float32))]
    config = peft.peft_lora_config(r, 16, ["q_proj"], dropout=0.05)
    files = peft.write_peft_adapter(tensors, tmp_path / "ad", config)
    assert files == [peft.ADAPTER_FILE, peft.ADAPTER_CONFIG_FILE]
    saved = json.loads((tmp_path / "ad" / peft.ADAPTER_CONFIG_FILE).read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == r and saved["lora_alpha"] == 16
    loaded = torch_load_file(tmp_path / "ad" / peft.ADAPTER_FILE)
    np.testing.assert_array_equal(loaded[f"{base}.lora_B.weight"].numpy(), tensors[1][1])
    with pytest.raises(sio.SafetensorsError, match="does not have rank r=4 on axis 1"):
        peft.write_peft_adapter([tensors[0], (tensors[1][0], np.ones((24, 3)))], tmp_path / "b", config)
    with pytest.raises(sio.SafetensorsError, match="needs both lora_A and lora_B"):
        peft.write_peft_adapter(tensors[:1], tmp_path / "c", config)
    with pytest.raises(sio.SafetensorsError, match="expected a name like"):
        peft.write_peft_adapter([("model.q_proj.lora_A.weight", np.ones((r, 2)))], tmp_path / "d",
                               config)
