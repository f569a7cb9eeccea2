"""Tokenise once: a random-access, memory-mapped on-disk cache of tokenized rows.

Tokenising 60K rows with a 128k-vocab tokenizer takes long enough that every run (and
every restart of a run) should not repeat it. The cache stores the four per-row arrays of
the Batch contract concatenated into flat `.npy` files plus an `offsets.npy` (row i is
`[offsets[i], offsets[i+1])`), opened with `mmap_mode="r"`, so a row is a cheap slice and
Grain can read rows in any order without loading the data set into memory.

Layout: `<cache_root>/<sha256(key)[:24]>/{manifest.json, offsets.npy, input_ids.npy, ...}`.
The caller's `key` names everything that changes the tokens (tokenizer hash, template,
max length, refusal id, data file hash); the manifest repeats the full key, the counts
and the dtypes, so a mismatched or corrupt cache is detected and rebuilt (with a logged
reason) instead of silently used.

Writes are atomic: rows stream into a temporary directory beside the final one, which is
renamed into place only when complete. A run killed mid-write leaves a `.tmp-*` directory
that is never read (a later build of the same key removes it once it has been idle an hour).
String metadata per row (e.g. `kind`, `source`) is kept like the tokens: the UTF-8 bytes of
every row's string concatenated in `meta_<name>.npy`, with `meta_<name>_offsets.npy`. Read
lazily through the memory map, so a cache of a million rows (a million distinct `source`
strings) adds no Python objects to the loader's memory. (Version 1 kept a vocabulary in the
manifest: 1M strings parsed into the heap of every process that opened it.)
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from derta_jax.data.packing import ROW_KEYS, check_row

log = logging.getLogger(__name__)

FORMAT = "derta_jax.token_cache"
VERSION = 2
ARRAY_DTYPES = {"input_ids": "int32", "targets": "int32", "loss_mask": "bool", "rto_mask": "bool"}
MANIFEST = "manifest.json"
_NO_LIMIT = 2**62


class CacheError(ValueError):
    """The cache directory exists but cannot be used (the message says why)."""


def cache_dir_for(cache_root: str | os.PathLike, key: str) -> Path:
    """The directory that holds (or will hold) the cache for `key`."""
    return Path(cache_root) / hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]


def files_digest(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over the bytes of data files (in the given order): the part of a cache key
    that changes when a user edits their JSONL."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.getsize(path).to_bytes(8, "little"))  # where one file ends
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class TokenCache:
    """Read side: `len(cache)`, `cache[i] -> {input_ids, targets, loss_mask, rto_mask, meta...}`.

    Arrays are read-only memory-mapped slices. `lengths` gives every row's length
    without touching the token files (the loader plans packing from it).
    """

    def __init__(self, path: str | os.PathLike, key: str):
        self.path = Path(path)
        manifest_file = self.path / MANIFEST
        try:
            manifest = json.loads(manifest_file.read_text("utf-8"))
        except FileNotFoundError:
            raise CacheError(f"{manifest_file}: missing") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise CacheError(f"{manifest_file}: not valid JSON ({err})") from None
        if not isinstance(manifest, dict):
            raise CacheError(f"{manifest_file}: expected a JSON object")
        for field, want in (("format", FORMAT), ("version", VERSION), ("key", key)):
            if manifest.get(field) != want:
                raise CacheError(f"{manifest_file}: field {field!r} is "
                                 f"{manifest.get(field)!r}, expected {want!r}")
        self.key = key
        self.num_rows = _manifest_int(manifest, "num_rows", manifest_file)
        self.num_tokens = _manifest_int(manifest, "num_tokens", manifest_file)
        self.offsets = self._open("offsets", "int64", self.num_rows + 1)
        self.arrays = {name: self._open(name, dtype, self.num_tokens)
                       for name, dtype in ARRAY_DTYPES.items()}
        offsets = np.asarray(self.offsets)
        if offsets[0] != 0 or offsets[-1] != self.num_tokens or np.any(np.diff(offsets) < 0):
            raise CacheError(f"{self.path / 'offsets.npy'}: offsets are not increasing from "
                             f"0 to num_tokens={self.num_tokens}")
        self.lengths = np.diff(offsets)
        names = manifest.get("meta", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CacheError(f"{manifest_file}: field 'meta' must be a list of names")
        self.meta = {}
        for name in names:
            ends = self._open(f"meta_{name}_offsets", "int64", self.num_rows + 1)
            self.meta[name] = (self._open(f"meta_{name}", "uint8", int(ends[-1])), ends)

    def _open(self, name: str, dtype: str, length: int) -> np.ndarray:
        file = self.path / f"{name}.npy"
        try:
            array = np.load(file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise CacheError(f"{file}: unreadable ({err})") from None
        if array.dtype != np.dtype(dtype) or array.shape != (length,):
            raise CacheError(f"{file}: holds {array.dtype}{list(array.shape)}, manifest "
                             f"says {dtype}[{length}]")
        return array

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict:
        if not -self.num_rows <= index < self.num_rows:
            raise IndexError(f"row {index} out of range for a cache of {self.num_rows} rows")
        index %= self.num_rows
        span = slice(int(self.offsets[index]), int(self.offsets[index + 1]))
        row: dict = {name: array[span] for name, array in self.arrays.items()}
        for name, (data, ends) in self.meta.items():
            row[name] = bytes(data[int(ends[index]):int(ends[index + 1])]).decode("utf-8")
        return row


def _manifest_int(manifest: dict, field: str, file: Path) -> int:
    value = manifest.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CacheError(f"{file}: field {field!r} must be a non-negative integer, got {value!r}")
    return value


def write_token_cache(cache_root: str | os.PathLike, key: str,
                      rows: Iterable[Mapping]) -> TokenCache:
    """Streams `rows` into a new cache for `key` and renames it into place atomically,
    replacing an unusable old one. The key names the content: a valid cache for the same
    key that appears meanwhile (another process) is kept and this build discarded.

    Rows are dicts with the four contract arrays; extra string fields become metadata.
    Memory use is bounded by one row: arrays go straight to disk.
    """
    final = cache_dir_for(cache_root, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_into(tmp, key, rows)
        _install(tmp, final, key)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _remove_abandoned_builds(final)
    return TokenCache(final, key)


def load_or_build_cache(cache_root: str | os.PathLike, key: str,
                        make_rows: Callable[[], Iterable[Mapping]]) -> TokenCache:
    """Opens the cache for `key`; builds it with `make_rows()` if absent or unusable."""
    path = cache_dir_for(cache_root, key)
    if path.exists():
        try:
            cache = TokenCache(path, key)
            log.info("token cache: using %s (%d rows, %d tokens)", path, len(cache),
                     cache.num_tokens)
            return cache
        except CacheError as err:
            log.warning("token cache: %s; rebuilding", err)
    else:
        log.info("token cache: none at %s; building it", path)
    return write_token_cache(cache_root, key, make_rows())


def _write_into(directory: Path, key: str, rows: Iterable[Mapping]) -> None:
    raw = {name: open(directory / f"{name}.raw", "wb") for name in ARRAY_DTYPES}
    offsets = array.array("q", [0])
    meta: dict[str, tuple] = {}  # name -> (raw bytes file, end offsets)
    try:
        for index, row in enumerate(rows):
            check_row(row, index, _NO_LIMIT)
            for name, dtype in ARRAY_DTYPES.items():
                raw[name].write(np.ascontiguousarray(row[name], dtype=dtype).tobytes())
            offsets.append(offsets[-1] + len(row["input_ids"]))
            _write_meta(row, index, directory, meta)
    finally:
        for handle in list(raw.values()) + [m[0] for m in meta.values()]:
            handle.close()
    num_rows, num_tokens = len(offsets) - 1, offsets[-1]
    for name, dtype in ARRAY_DTYPES.items():
        _raw_to_npy(directory / f"{name}.raw", directory / f"{name}.npy", dtype, num_tokens)
    _save(directory / "offsets.npy", np.frombuffer(offsets, np.int64))
    for name, (_, ends) in meta.items():
        _raw_to_npy(directory / f"meta_{name}.raw", directory / f"meta_{name}.npy", "uint8",
                    ends[-1])
        _save(directory / f"meta_{name}_offsets.npy", np.frombuffer(ends, np.int64))
    manifest = {"format": FORMAT, "version": VERSION, "key": key, "num_rows": num_rows,
                "num_tokens": num_tokens, "dtypes": ARRAY_DTYPES, "meta": sorted(meta)}
    with open(directory / MANIFEST, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def _write_meta(row: Mapping, index: int, directory: Path, meta: dict) -> None:
    """Appends the row's string fields to their files (the first row names the fields)."""
    names = sorted(k for k, v in row.items() if k not in ROW_KEYS and isinstance(v, str))
    if index == 0:
        for name in names:
            meta[name] = (open(directory / f"meta_{name}.raw", "wb"), array.array("q", [0]))
    if names != sorted(meta):
        raise ValueError(f"row {index}: string fields {names} differ from the first row's "
                         f"{sorted(meta)}")
    for name in names:
        handle, ends = meta[name]
        data = row[name].encode("utf-8")
        handle.write(data)
        ends.append(ends[-1] + len(data))


def _raw_to_npy(raw: Path, npy: Path, dtype: str, length: int) -> None:
    """Prepends a .npy header to a raw little-endian dump, without loading it."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
              "fortran_order": False, "shape": (length,)}
    with open(npy, "wb") as out, open(raw, "rb") as src:
        np.lib.format.write_array_header_1_0(out, header)
        shutil.copyfileobj(src, out, 1 << 22)
        out.flush()
        os.fsync(out.fileno())
    raw.unlink()


def _save(file: Path, array: np.ndarray) -> None:
    with open(file, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())


def _install(new: Path, final: Path, key: str) -> None:
    """Renames the complete build `new` to `final`. A valid cache of the same key already
    there (another process on a shared file system finished first) is kept and `new`
    dropped; an unusable one is moved aside first and deleted after, so a reader never
    sees a half-written directory."""
    for _ in range(3):
        if final.exists():
            try:
                TokenCache(final, key)
                log.info("token cache: %s was completed by another process; using it", final)
                return
            except CacheError:
                trash = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(final, trash)
                except FileNotFoundError:
                    continue
                shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(new, final)
        except OSError:
            if final.exists():
                continue  # another process renamed its build in between: check it
            raise
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    raise CacheError(f"{final}: could not install the new cache (concurrent rebuilds?)")


def _remove_abandoned_builds(final: Path, max_idle_s: float = 3600.0) -> None:
    """Deletes `.tmp-<name>-*` directories of interrupted builds of this key, once nothing
    has written to them for `max_idle_s` (a live build, maybe on another host sharing the
    file system, keeps appending to its files)."""
    now = time.time()
    for tmp in final.parent.glob(f".tmp-{final.name}-*"):
        try:
            newest = max([tmp.stat().st_mtime] + [f.stat().st_mtime for f in tmp.iterdir()])
        except FileNotFoundError:
            continue
        if now - newest > max_idle_s:
            log.info("token cache: removing abandoned partial build %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
