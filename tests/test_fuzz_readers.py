"""Fuzzing the readers of files a user hands over: every input parses or is refused with the
project's own error naming the file, never another exception.

    JSONL rows (derta_jax/data/formats.py)          -> DataError
    safetensors headers and index (hf/safetensors_io) -> SafetensorsError
    GGUF files (hf/gguf_import.py)                  -> GGUFImportError

A seeded mutator (stdlib `random`, no hypothesis): valid files are corrupted at the byte
level (bit flips, overwritten bytes, interesting integers such as 0xFFFFFFFF written over
length fields, truncation, deleted, inserted and duplicated spans) and at the structure level
(a JSON value replaced by another of any type, a field removed, a number of 5,000 digits,
arrays nested 5,000 deep). Each case names its seed and index, so a failure reproduces.
Thousands of cases run in a few seconds; the suite asserts that both outcomes happen, so a
mutator that only produced garbage (or nothing) fails too.
"""

from __future__ import annotations

import json
import os
import random
import time
import traceback

import gguf
import numpy as np
import pytest

from derta_jax.data import formats
from derta_jax.hf import gguf_import
from derta_jax.hf import safetensors_io as sio

SEED = 20240611
INTERESTING = (0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF,
               2**63 - 1, 2**64 - 1)
JSON_VALUES = (None, True, False, 0, -1, 1, 3, 2**64, 1.5, -0.0, 1e308, "", " ", "x", "true",
               "F32", "BF16", "I64", "\ufeff", [], {}, [1], [0, 4], [4, 0], [-1, 3], [True],
               ["F32"], [[1]], {"a": 1}, {"dtype": "F32"}, "a b c d")
PATHOLOGICAL = (b"1" * 5000, b"[" * 5000, b'{"a":' * 3000, b"\xff\xfe", b"\xef\xbb\xbf",
                b"\r", b"\n", b"\x00", b'"\\ud800"', b"NaN", b"-Infinity")


def mutate_bytes(data: bytes, rng: random.Random, hot: int | None = None) -> bytes:
    """1 to 8 byte-level corruptions; positions fall in data[:hot] four times out of five."""
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        if not out:
            out += rng.randbytes(rng.randrange(1, 16))
            continue
        limit = min(hot, len(out)) if hot and rng.random() < 0.8 else len(out)
        i = rng.randrange(limit)
        op = rng.randrange(8)
        if op == 0:
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[i] = rng.randrange(256)
        elif op == 2:
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(INTERESTING) % (1 << (8 * width))
            out[i:i + width] = value.to_bytes(width, "little")
        elif op == 3:
            del out[i:]
        elif op == 4:
            del out[i:i + rng.randrange(1, 16)]
        elif op == 5:
            out[i:i] = rng.randbytes(rng.randrange(1, 16))
        elif op == 6:
            j = rng.randrange(len(out))
            out[j:j] = out[i:i + rng.randrange(1, 32)]
        else:
            out[i:i] = rng.choice(PATHOLOGICAL)
    return bytes(out)


def random_json(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth < 3 and r < 0.15:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 3 and r < 0.25:
        keys = ("dtype", "shape", "data_offsets", "prefix", "text", "safe", "x", "")
        return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}
    return json.loads(json.dumps(rng.choice(JSON_VALUES)))


def mutate_json(value, rng: random.Random):
    """A copy of `value` with one to three leaves, entries or whole values replaced."""
    value = json.loads(json.dumps(value))
    for _ in range(rng.choice((1, 1, 2, 3))):
        if not isinstance(value, dict) or not value or rng.random() < 0.05:
            return random_json(rng)
        key = rng.choice(list(value))
        inner = value[key]
        if isinstance(inner, dict) and inner and rng.random() < 0.8:
            field = rng.choice(list(inner) + ["extra"])
            if rng.random() < 0.15:
                inner.pop(field, None)
            else:
                inner[field] = random_json(rng)
        elif rng.random() < 0.15:
            del value[key]
        else:
            value[key] = random_json(rng)
    return value


class Fuzz:
    """Runs cases and records every exception that is not `own_error`, with its case."""

    def __init__(self, name: str, own_error: type[Exception]):
        self.name, self.own_error = name, own_error
        self.parsed = self.refused = 0
        self.failures: list[str] = []

    def case(self, index: int, read) -> None:
        try:
            read()
        except self.own_error:
            self.refused += 1
            return
        except Exception as error:  # the point of the test: anything else is a bug
            where = traceback.extract_tb(error.__traceback__)[-1]
            self.failures.append(f"{self.name} seed={SEED} case={index}: {type(error).__name__}: "
                                 f"{str(error)[:200]} (at {os.path.basename(where.filename)}:"
                                 f"{where.lineno})")
            return
        self.parsed += 1

    def check(self, cases: int) -> None:
        assert not self.failures, "\n".join(self.failures[:10])
        assert self.parsed + self.refused == cases
        # Both outcomes happen: the mutator neither destroys every file nor leaves them all valid.
        assert self.parsed >= cases // 50 and self.refused >= cases // 10, (self.parsed,
                                                                              self.refused)


# ----------------------------------------------------------------------------- JSONL rows

ROWS = {
    "reference": [{"prefix": "Q: how do I bake bread?\nA:", "text": " Mix flour and water.",
                   "safe": "false"},
                  {"prefix": "Q: ünïcödé 日本語?\nA:", "text": " Sorry, I can't.", "safe": "true"},
                  {"prefix": "P", "text": "T", "safe": "false", "extra": [1, {"x": None}]}],
    "triples": [{"question": "How to pick a lock?", "safe_response": "I can't help with that.",
                 "harmful_response": "First insert a tension wrench."},
                {"question": "¿Qué?", "safe_response": "No.", "harmful_response": "one two three"}],
    "helpful": [{"instruction": "Name a colour.", "output": "Blue."},
                {"instruction": "Add 2 and 3.", "output": "5", "id": 7}],
}


def _jsonl(rows: list, rng: random.Random) -> bytes:
    lines = [json.dumps(row, ensure_ascii=rng.random() < 0.5).encode() for row in rows]
    text = b"\n".join(lines) + (b"\n" if rng.random() < 0.8 else b"")
    if rng.random() < 0.1:
        text = b"\xef\xbb\xbf" + text  # a BOM at the start is allowed
    if rng.random() < 0.1:
        text = text.replace(b"\n", b"\r\n")
    return text


def _mutated_jsonl(fmt: str, rng: random.Random) -> bytes:
    rows = [mutate_json(row, rng) if rng.random() < 0.3 else row for row in ROWS[fmt]]
    data = _jsonl(rows, rng)
    return mutate_bytes(data, rng) if rng.random() < 0.6 else data


def _line_count(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def test_jsonl_row_readers_raise_only_data_errors(tmp_path):
    rng = random.Random(SEED)
    path = str(tmp_path / "rows.jsonl")
    fuzz, cases = Fuzz("jsonl", formats.DataError), 2500
    for index in range(cases):
        fmt = rng.choice(formats.FORMATS)
        data = _mutated_jsonl(fmt, rng)
        with open(path, "wb") as f:
            f.write(data)

        def read():
            skipped = formats.read_rows(path, fmt, on_error="skip")
            # skip mode never raises: every line is a row or a reported skip
            assert len(skipped.rows) + len(skipped.skipped) == _line_count(data)
            objects = formats.read_json_objects(path, on_error="skip")
            assert len(objects.rows) + len(objects.skipped) == _line_count(data)
            formats.read_rows(path, fmt, on_error="raise")

        fuzz.case(index, read)
    fuzz.check(cases)


def test_jsonl_pathological_json_is_a_data_error_naming_the_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    for line, why in ((b'{"prefix": ' + b"9" * 5000 + b"}", "invalid JSON: Exceeds the limit"),
                      (b"[" * 100_000 + b"]" * 100_000, "invalid JSON: nested too deeply")):
        path.write_bytes(b'{"prefix": "p", "text": "t", "safe": "true"}\n' + line + b"\n")
        with pytest.raises(formats.DataError, match=f"^{path}:2: <line>: {why}"):
            formats.read_reference(str(path))


# ----------------------------------------------------------------------------- safetensors


def _checkpoint(directory) -> None:
    sio.write_safetensors_file(os.path.join(directory, sio.SINGLE_FILE), [
        ("embed", np.arange(12, dtype=np.float32).reshape(3, 4)),
        ("ids", np.arange(4, dtype=np.int64)),
        ("half", np.ones((2, 2), np.float16)),
        ("scalar", np.array(2.5, np.float32))], {"format": "pt"})


def test_safetensors_headers_raise_only_safetensors_errors(tmp_path):
    _checkpoint(tmp_path)
    path = tmp_path / sio.SINGLE_FILE
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + header_len]), data[8 + header_len:]
    rng = random.Random(SEED)
    fuzz, cases = Fuzz("safetensors", sio.SafetensorsError), 2500
    for index in range(cases):
        if rng.random() < 0.6:  # a well-framed header with wrong content
            raw = json.dumps(mutate_json(header, rng)).encode()
            if rng.random() < 0.2:
                raw = mutate_bytes(raw, rng)
            mutated = len(raw).to_bytes(8, "little") + raw + body
        else:
            mutated = mutate_bytes(data, rng, hot=8 + header_len)
        path.write_bytes(mutated)
        fuzz.case(index, lambda: [None for _ in sio.iter_checkpoint(str(tmp_path))])
    fuzz.check(cases)


def test_safetensors_index_raises_only_safetensors_errors(tmp_path):
    tensors = [(f"t{i}", np.full((4, 4), i, np.float32)) for i in range(4)]
    sio.write_safetensors_sharded(tensors, str(tmp_path), max_shard_bytes=130)
    index_path = tmp_path / sio.INDEX_FILE
    raw_index = index_path.read_bytes()
    index = json.loads(raw_index)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2
    names = shards + ["../" + shards[0], "/etc/passwd", "a/b.safetensors", "missing.safetensors"]
    rng = random.Random(SEED)
    fuzz, cases = Fuzz("index", sio.SafetensorsError), 1000
    for index_number in range(cases):
        r = rng.random()
        if r < 0.4:  # reassign tensors, to real shards, other paths or any JSON value
            mutated = json.loads(raw_index)
            for _ in range(rng.choice((1, 2))):
                name = rng.choice(list(mutated["weight_map"]) + ["t9"])
                mutated["weight_map"][name] = (rng.choice(names) if rng.random() < 0.5
                                               else random_json(rng))
            data = json.dumps(mutated).encode()
        elif r < 0.7:
            data = json.dumps(mutate_json(index, rng)).encode()
        else:
            data = mutate_bytes(raw_index, rng)
        index_path.write_bytes(data)
        fuzz.case(index_number, lambda: sio.scan_checkpoint(str(tmp_path)))
    fuzz.check(cases)


# ----------------------------------------------------------------------------- GGUF

TOKENS = ["<s>", "</s>", "a", "b", "c", "ab", "Ġ", "Ġa", "abc", "d", "e", "f"]


def write_gguf(path, *, heads: int = 2, tensors: bool = True, merges=("a b", "Ġ a", "ab c"),
               bos: int = 0) -> None:
    """A small valid Llama GGUF with a byte-level BPE tokenizer (llama.cpp's names)."""
    d, f, v, kv_heads = 8, 12, len(TOKENS), 1
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(32)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(f)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3] + [1] * (v - 2))
    writer.add_token_merges(list(merges))
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(1)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    rng = np.random.default_rng(0)
    kv = d // 2 * kv_heads
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,),
              "blk.0.attn_q.weight": (d, d), "blk.0.attn_k.weight": (kv, d),
              "blk.0.attn_v.weight": (kv, d), "blk.0.attn_output.weight": (d, d),
              "blk.0.ffn_gate.weight": (f, d), "blk.0.ffn_up.weight": (f, d),
              "blk.0.ffn_down.weight": (d, f), "blk.0.attn_norm.weight": (d,),
              "blk.0.ffn_norm.weight": (d,)}
    for name, shape in shapes.items():
        if tensors or name != "token_embd.weight":
            writer.add_tensor(name, rng.normal(size=shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_gguf(path: str) -> None:
    """What import_gguf reads, without writing: metadata, every tensor, the tokenizer."""
    reader = gguf_import.open_gguf(path)
    config = gguf_import.hf_config(reader, path)
    for _ in gguf_import.iter_hf_tensors(reader, config, path):
        pass
    gguf_import.build_tokenizer(reader, path)


def test_gguf_files_raise_only_gguf_import_errors(tmp_path):
    write_gguf(tmp_path / "valid.gguf")
    data = (tmp_path / "valid.gguf").read_bytes()
    read_gguf(str(tmp_path / "valid.gguf"))
    metadata_end = gguf_import.open_gguf(str(tmp_path / "valid.gguf")).data_offset
    path = str(tmp_path / "mutated.gguf")
    rng = random.Random(SEED)
    fuzz, cases = Fuzz("gguf", gguf_import.GGUFImportError), 800
    for index in range(cases):
        with open(path, "wb") as f:
            f.write(mutate_bytes(data, rng, hot=metadata_end))
        fuzz.case(index, lambda: read_gguf(path))
    fuzz.check(cases)


def _patch_after(data: bytes, key: bytes, offset: int, value: bytes) -> bytes:
    """`data` with `value` written `offset` bytes after the end of the metadata key `key`."""
    at = data.index(key) + len(key) + offset
    return data[:at] + value + data[at + len(value):]


def test_gguf_array_with_a_corrupt_length_fails_at_once(tmp_path):
    """The gguf package walks a 2**63-element array past the end of the file for ever; the
    reader here stops at the end of the file."""
    write_gguf(tmp_path / "valid.gguf")
    data = (tmp_path / "valid.gguf").read_bytes()
    # after the key: value type (u32 ARRAY), element type (u32 STRING), then the u64 length
    corrupt = _patch_after(data, b"tokenizer.ggml.tokens", 8, (2**63).to_bytes(8, "little"))
    (tmp_path / "corrupt.gguf").write_bytes(corrupt)
    start = time.perf_counter()
    with pytest.raises(gguf_import.GGUFImportError,
                       match=r"corrupt\.gguf: not a readable GGUF file \(ValueError: .* run past "
                             r"the end of the file"):
        gguf_import.import_gguf(str(tmp_path / "corrupt.gguf"), str(tmp_path / "out"))
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant, message", [
    (dict(heads=0), r"metadata field 'llama.attention.head_count'=0: must be an integer >= 1"),
    (dict(tensors=False), r"no 2-d tensor 'token_embd.weight'"),
    (dict(bos=99), r"metadata field 'tokenizer.ggml.bos_token_id'=99: must be a token id in "
                   r"\[0, 12\)"),
])
def test_gguf_metadata_that_cannot_be_imported_is_named(tmp_path, variant, message):
    path = tmp_path / "bad.gguf"
    write_gguf(path, **variant)
    with pytest.raises(gguf_import.GGUFImportError, match=f"^{path}: {message}"):
        gguf_import.import_gguf(str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_gguf_merge_of_unknown_tokens_is_named(tmp_path):
    """tokenizers raises a bare Exception for it."""
    path = tmp_path / "bad.gguf"
    write_gguf(path, merges=("a z",))
    with pytest.raises(gguf_import.GGUFImportError, match=f"^{path}: tokenizer.ggml.merges: "):
        gguf_import.build_tokenizer(gguf_import.open_gguf(str(path)), str(path))
