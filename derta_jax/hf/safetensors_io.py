"""Streaming safetensors I/O for Hugging Face checkpoint directories.

Why this module exists: a 70B checkpoint does not fit in host memory twice, so import
must see one tensor at a time and export must never hold the whole model. The
safetensors format is simple enough to parse here (8-byte little-endian header length,
a JSON header, then raw little-endian tensor bytes), which lets us memory-map each shard,
read bfloat16 (that `safetensors.numpy` cannot) through `ml_dtypes`, and validate every
byte range before touching it, so a truncated or inconsistent checkpoint fails with the
tensor and the file named instead of loading partially.

Layouts read and written, as transformers does:
  * one `model.safetensors`, or
  * shards `model-00001-of-0000N.safetensors` + `model.safetensors.index.json`
    ({"metadata": {"total_size": bytes, "total_parameters": n}, "weight_map": {name: file}}).
A PEFT LoRA adapter is `adapter_model.safetensors` + `adapter_config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import ml_dtypes
import numpy as np

from derta_jax.paths import prepare_output_dir

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the reference implementation enforces

# safetensors dtype code -> numpy dtype (explicitly little-endian where it matters).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
FLOAT_CODES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})
_CODE_OF_DTYPE = {dt.newbyteorder("="): code for code, dt in DTYPES.items()}

DTypeLike = Union[str, np.dtype, type]


class SafetensorsError(ValueError):
    """A checkpoint file or directory is malformed; the message names the file and tensor."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: absolute byte range [begin, end) inside `file`."""

    name: str
    code: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int
    end: int
    file: str

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.code]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


# ----------------------------------------------------------------------------- reading


def _reject_duplicate_keys(path: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise SafetensorsError(f"{path}: duplicate tensor name {key!r} in the header")
            seen[key] = value
        return seen

    return hook


def _load_json(raw: bytes, path: str, what: str) -> Any:
    """JSON from `raw`; every way it can fail is a SafetensorsError naming `path`."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys(path))
    except SafetensorsError:
        raise
    # ValueError: bad UTF-8 or JSON, an integer of more than 4300 digits; RecursionError:
    # arrays nested thousands deep.
    except (ValueError, RecursionError) as e:
        raise SafetensorsError(f"{path}: {what} is not valid JSON ({_short(e)})") from None


def _short(value: Any, limit: int = 200) -> str:
    """repr (or str, for an exception) of `value`, cut to `limit` characters for a message."""
    text = str(value) if isinstance(value, BaseException) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_safetensors_header(path: str) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parses and validates one file's header; returns (entries by name, __metadata__)."""
    path = os.fspath(path)
    file_size = os.path.getsize(path)
    if file_size < 8:
        raise SafetensorsError(f"{path}: truncated file ({file_size} bytes, no header length)")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: header length {header_len} exceeds {MAX_HEADER_BYTES} bytes")
        if 8 + header_len > file_size:
            raise SafetensorsError(
                f"{path}: truncated file: header of {header_len} bytes runs past the end "
                f"of the file ({file_size} bytes)")
        raw = f.read(header_len)
    header = _load_json(raw, path, "header")
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must be an object of strings, got "
                               f"{_short(metadata)}")
    data_start = 8 + header_len
    data_size = file_size - data_start
    entries = {}
    for name, info in header.items():
        entries[name] = _parse_entry(path, name, info, data_start, data_size)
    return entries, metadata


def _parse_entry(path: str, name: str, info: Any, data_start: int, data_size: int) -> TensorEntry:
    def fail(why: str) -> SafetensorsError:
        return SafetensorsError(f"{path}: tensor {name!r}: {why}")

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise fail("header entry must have dtype, shape and data_offsets")
    code = info["dtype"]
    if not isinstance(code, str) or code not in DTYPES:  # a list or object is unhashable
        raise fail(f"unsupported dtype {_short(code)} (supported: {', '.join(DTYPES)})")
    shape = info["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise fail(f"shape {_short(shape)} must be a list of non-negative integers")
    offsets = info["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise fail(f"data_offsets {_short(offsets)} must be [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[code].itemsize
    if end - begin != expected:
        raise fail(f"data_offsets {offsets} hold {end - begin} bytes but shape {shape} of "
                   f"{code} needs {expected}")
    if end > data_size:
        raise fail(f"truncated file: data_offsets {offsets} run past the end of the data "
                   f"({data_size} bytes)")
    return TensorEntry(name, code, tuple(shape), data_start + begin, data_start + end, path)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no size


def _safe_join(hf_dir: str, filename: str, where: str) -> str:
    if (not isinstance(filename, str) or os.path.isabs(filename)
            or os.path.normpath(filename).startswith("..") or os.sep in os.path.normpath(filename)):
        raise SafetensorsError(f"{where}: shard file name {filename!r} must be a plain file name "
                               f"inside the checkpoint directory")
    return os.path.join(hf_dir, filename)


def scan_checkpoint(hf_dir: str) -> dict[str, TensorEntry]:
    """Every tensor of an HF directory (single file or sharded), validated, without reading data.

    Raises SafetensorsError naming the file and tensor for: a missing weights file, an index
    naming a missing shard, a tensor listed in the index but absent from its shard (or
    present in a shard the index does not assign it to), and duplicate tensor names.
    """
    hf_dir = os.fspath(hf_dir)
    index_path = os.path.join(hf_dir, INDEX_FILE)
    single_path = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.isfile(index_path):
        with open(index_path, "rb") as f:
            index = _load_json(f.read(), index_path, "the index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise SafetensorsError(f"{index_path}: field 'weight_map' must be a non-empty object")
        by_file: dict[str, list[str]] = {}
        for name, filename in weight_map.items():
            _safe_join(hf_dir, filename, f"{index_path}: tensor {name!r}")  # a str, or raises
            by_file.setdefault(filename, []).append(name)
        entries: dict[str, TensorEntry] = {}
        for filename in sorted(by_file):
            path = _safe_join(hf_dir, filename, index_path)
            if not os.path.isfile(path):
                raise SafetensorsError(
                    f"{index_path}: weight_map names file {filename!r} (for tensor "
                    f"{by_file[filename][0]!r}) but {path} does not exist")
            shard_entries, _ = read_safetensors_header(path)
            for name in by_file[filename]:
                if name not in shard_entries:
                    raise SafetensorsError(
                        f"{path}: tensor {name!r} is listed in {index_path} but absent from this file")
            for name, entry in shard_entries.items():
                if weight_map.get(name) != filename:
                    where = (f"assigned to {weight_map[name]!r} by the index" if name in weight_map
                             else f"not listed in {index_path}")
                    raise SafetensorsError(
                        f"{path}: duplicate or unindexed tensor {name!r} ({where})")
                entries[name] = entry
        return entries
    if os.path.isfile(single_path):
        return read_safetensors_header(single_path)[0]
    raise SafetensorsError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} found "
                           f"(only safetensors checkpoints are read)")


def _check_castable(entry: TensorEntry, target: Optional[np.dtype]) -> None:
    if target is None or target == entry.dtype:
        return
    if entry.code not in FLOAT_CODES or not _is_float(target):
        raise SafetensorsError(
            f"{entry.file}: tensor {entry.name!r} of dtype {entry.code} cannot be cast to {target.name}")


def _is_float(dtype: np.dtype) -> bool:
    return dtype.newbyteorder("=") in {DTYPES[c].newbyteorder("=") for c in FLOAT_CODES}


def as_numpy_dtype(dtype: Optional[DTypeLike]) -> Optional[np.dtype]:
    """'bfloat16' / 'float32' / np.float16 / ... -> np.dtype (None stays None)."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in ("bfloat16", "bf16"):
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def read_tensor(entry: TensorEntry, dtype: Optional[DTypeLike] = None,
                mapped: Optional[np.ndarray] = None) -> np.ndarray:
    """Reads one tensor (a read-only memory-mapped view when no cast is needed)."""
    target = as_numpy_dtype(dtype)
    _check_castable(entry, target)
    if mapped is None:
        mapped = np.memmap(entry.file, dtype=np.uint8, mode="r")
    raw = np.asarray(mapped[entry.begin:entry.end])
    array = raw.view(entry.dtype).reshape(entry.shape)
    if target is not None and target != entry.dtype:
        array = array.astype(target)
    return array


def iter_checkpoint(hf_dir: str, dtype: Optional[DTypeLike] = None
                    ) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yields (name, array, source_file) one tensor at a time, shard by shard.

    All headers are validated before the first tensor is yielded, so a bad checkpoint fails
    before any partial load. Each shard is memory-mapped: arrays that need no cast are
    read-only views of the file (copy them to keep them past the shard), so peak host
    memory stays around one shard. `dtype` casts floating tensors (e.g. "bfloat16");
    a non-floating tensor with a floating target raises.
    """
    entries = scan_checkpoint(hf_dir)
    target = as_numpy_dtype(dtype)
    for entry in entries.values():
        _check_castable(entry, target)
    by_file: dict[str, list[TensorEntry]] = {}
    for entry in entries.values():
        by_file.setdefault(entry.file, []).append(entry)
    for path in sorted(by_file):
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
        for entry in sorted(by_file[path], key=lambda e: e.begin):
            yield entry.name, read_tensor(entry, target, mapped), path
        del mapped


# ----------------------------------------------------------------------------- writing


def parse_size(size: Union[int, str]) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, 1234 -> 1234 (decimal units as HF)."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size={size!r}: must be positive")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r}: expected e.g. 5GB, 500MB, 2GiB or a byte count")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    value = int(number * scale)
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r}: must be positive")
    return value


def _dtype_code(name: str, array: np.ndarray) -> str:
    code = _CODE_OF_DTYPE.get(array.dtype.newbyteorder("="))
    if code is None:
        raise SafetensorsError(f"tensor {name!r}: dtype {array.dtype} has no safetensors code")
    return code


def _little_endian_bytes(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def write_safetensors_file(path: str, tensors: list[tuple[str, np.ndarray]],
                           metadata: Optional[Mapping[str, str]] = None) -> int:
    """Writes one safetensors file; returns its tensor-data size in bytes.

    Tensors are laid out by decreasing item size so every tensor starts aligned to its
    element size (the header is padded to 8 bytes), which keeps zero-copy readers happy.
    """
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise SafetensorsError(f"{path}: metadata must map str to str, got {dict(metadata)!r}")
        header["__metadata__"] = dict(metadata)
    ordered = sorted(tensors, key=lambda item: -np.asarray(item[1]).dtype.itemsize)
    offset = 0
    for name, array in ordered:
        if name in header or name == "__metadata__":
            raise SafetensorsError(f"{path}: duplicate tensor name {name!r}")
        array = np.asarray(array)
        header[name] = {"dtype": _dtype_code(name, array), "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for _, array in ordered:
            f.write(_little_endian_bytes(array))
    return offset


def _remove_stale_weights(out_dir: str) -> None:
    for filename in os.listdir(out_dir):
        if (filename in (SINGLE_FILE, INDEX_FILE) or SHARD_PATTERN.fullmatch(filename)
                or re.fullmatch(r"model-\d{5}\.safetensors\.tmp", filename)):
            os.remove(os.path.join(out_dir, filename))


def write_safetensors_sharded(tensors: Iterable[tuple[str, np.ndarray]], out_dir: str,
                              max_shard_bytes: Union[int, str] = "5GB",
                              metadata: Optional[Mapping[str, str]] = None,
                              overwrite: bool = False) -> list[str]:
    """Streams (name, array) pairs into shards of at most `max_shard_bytes` tensor data.

    Like transformers' save_pretrained: tensors fill shards in arrival order, a tensor larger
    than the limit gets its own shard, one shard is written as `model.safetensors` without
    an index, several as `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`.
    At most one shard's tensors are held at a time. Every shard's metadata gets
    {"format": "pt"} (transformers refuses files without it) plus `metadata`.
    Returns the written file names (index last).
    """
    limit = parse_size(max_shard_bytes)
    prepare_output_dir(out_dir, overwrite)
    _remove_stale_weights(out_dir)
    shard_meta = {"format": "pt", **(metadata or {})}
    temp_names: list[str] = []
    weight_map: dict[str, int] = {}  # tensor name -> shard number (0-based)
    total_size = 0
    total_params = 0
    pending: list[tuple[str, np.ndarray]] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending:
            return
        temp = f"model-{len(temp_names) + 1:05d}.safetensors.tmp"
        write_safetensors_file(os.path.join(out_dir, temp), pending, shard_meta)
        temp_names.append(temp)
        pending, pending_bytes = [], 0

    for name, array in tensors:
        if not isinstance(name, str) or not name:
            raise SafetensorsError(f"tensor name {name!r} must be a non-empty string")
        if name in weight_map:  # every name seen so far, written or pending
            raise SafetensorsError(f"duplicate tensor name {name!r} written to {out_dir}")
        array = np.asarray(array)
        _dtype_code(name, array)
        if pending and pending_bytes + array.nbytes > limit:
            flush()
        pending.append((name, array))
        pending_bytes += array.nbytes
        weight_map[name] = len(temp_names)
        total_size += array.nbytes
        total_params += array.size
    flush()
    if not temp_names:
        raise SafetensorsError(f"no tensors were given to write to {out_dir}")

    count = len(temp_names)
    if count == 1:
        os.replace(os.path.join(out_dir, temp_names[0]), os.path.join(out_dir, SINGLE_FILE))
        return [SINGLE_FILE]
    final_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    for temp, final in zip(temp_names, final_names):
        os.replace(os.path.join(out_dir, temp), os.path.join(out_dir, final))
    index = {"metadata": {"total_parameters": total_params, "total_size": total_size},
             "weight_map": {name: final_names[i] for name, i in sorted(weight_map.items())}}
    with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return final_names + [INDEX_FILE]
