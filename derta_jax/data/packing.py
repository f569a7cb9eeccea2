"""Rows to fixed-shape sequences: padding mode, packing mode, and the packing plan.

The tokenizer hands over one variable-length row at a time (`input_ids`, `targets`,
`loss_mask`, `rto_mask`; see the Batch contract in DESIGN.md). A training step needs
fixed `[B, T]` arrays. Two ways to get there:

* padding: one row per sequence, the rest is padding (segment id 0);
* packing: several rows share a sequence, each with its own segment id 1, 2, ... and
  positions restarting at 0, so attention (which never crosses segment ids) and RoPE see
  each row exactly as they would alone.

Targets are computed per row by the tokenizer, so a row's last position is never trained
to predict the first token of the next packed row: packing only concatenates, it never
recomputes targets. That is why packing gives the same per-row losses as padding.

Everything here is a pure function of its arguments (the packing plan included), which
is what lets the loader recompute the exact same sequences after a restart.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

ROW_KEYS = ("input_ids", "targets", "loss_mask", "rto_mask")
BATCH_KEYS = ROW_KEYS + ("positions", "segment_ids")
BATCH_DTYPES = {
    "input_ids": np.int32,
    "targets": np.int32,
    "loss_mask": np.bool_,
    "rto_mask": np.bool_,
    "positions": np.int32,
    "segment_ids": np.int32,
}


def describe_row(row: Mapping, index: int) -> str:
    """`row 7`, or `row 7 (train.jsonl:8)` when the row carries a `source` string."""
    source = row.get("source") if isinstance(row, Mapping) else None
    return f"row {index} ({source})" if source else f"row {index}"


def check_row(row: Mapping, index: int, seq_len: int) -> int:
    """Validates one tokenized row against the contract and returns its length.

    Raises ValueError naming the row (and its `source`, if any) and the field.
    """
    where = describe_row(row, index)
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a dict of arrays, got {type(row).__name__}")
    for key in ROW_KEYS:
        if key not in row:
            raise ValueError(f"{where}: field {key!r} is missing (a row needs {ROW_KEYS})")
    arrays = {key: np.asarray(row[key]) for key in ROW_KEYS}
    length = arrays["input_ids"].shape[0] if arrays["input_ids"].ndim == 1 else -1
    for key, array in arrays.items():
        if array.ndim != 1:
            raise ValueError(f"{where}: field {key!r} must be 1-D, got shape {array.shape}")
        if array.shape[0] != length:
            raise ValueError(f"{where}: field {key!r} has length {array.shape[0]}, "
                             f"expected {length} (the length of input_ids)")
        if key in ("input_ids", "targets") and array.dtype.kind not in "iu":
            raise ValueError(f"{where}: field {key!r} must hold integers, got {array.dtype}")
        if key in ("loss_mask", "rto_mask") and array.dtype != np.bool_:
            raise ValueError(f"{where}: field {key!r} must be bool, got {array.dtype}")
    if length == 0:
        raise ValueError(f"{where}: field 'input_ids' is empty")
    if length > seq_len:
        raise ValueError(f"{where}: field 'input_ids' has {length} tokens, more than "
                         f"seq_len={seq_len} (truncate when tokenizing, not in the loader)")
    if np.any(arrays["rto_mask"] & ~arrays["loss_mask"]):
        raise ValueError(f"{where}: field 'rto_mask' is set where 'loss_mask' is not "
                         f"(RTO positions must be supervised positions)")
    return int(length)


def empty_sequence(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A sequence of padding only: no token is attended to usefully or supervised."""
    out = {key: np.zeros((seq_len,), dtype) for key, dtype in BATCH_DTYPES.items()}
    out["input_ids"][:] = pad_id
    return out


def pack_sequence(rows: Sequence[Mapping], seq_len: int, pad_id: int,
                  row_indices: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Concatenates rows into one `[seq_len]` sequence, segment ids 1..len(rows).

    `row_indices` only serves error messages (the rows' indices in the data set).
    """
    indices = range(len(rows)) if row_indices is None else row_indices
    lengths = [check_row(row, index, seq_len) for row, index in zip(rows, indices)]
    if sum(lengths) > seq_len:
        raise ValueError(f"rows {list(indices)} hold {sum(lengths)} tokens together, "
                         f"more than seq_len={seq_len}")
    out = empty_sequence(seq_len, pad_id)
    start = 0
    for segment, (row, length) in enumerate(zip(rows, lengths), start=1):
        span = slice(start, start + length)
        for key in ROW_KEYS:
            out[key][span] = row[key]
        out["positions"][span] = np.arange(length, dtype=np.int32)
        out["segment_ids"][span] = segment
        start += length
    return out


def pad_rows(rows: Sequence[Mapping], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Padding mode: one row per sequence, `[len(rows), seq_len]` arrays."""
    return stack_sequences([pack_sequence([row], seq_len, pad_id, [index])
                            for index, row in enumerate(rows)], seq_len, pad_id)


def stack_sequences(sequences: Sequence[Mapping], seq_len: int,
                    pad_id: int) -> dict[str, np.ndarray]:
    """Stacks `[T]` sequences into a `[B, T]` batch (B = 0 gives empty arrays)."""
    if not sequences:
        return {key: np.zeros((0, seq_len), dtype) for key, dtype in BATCH_DTYPES.items()}
    return {key: np.stack([seq[key] for seq in sequences]) for key in BATCH_KEYS}


def ffd_bins(lengths: Sequence[int], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """First-fit-decreasing as arrays: items into bins of capacity seq_len, longest first,
    each into the first bin with room (ties keep the input order). Returns (items, sizes):
    item indices grouped by bin, bins in order of opening and each bin's items in order of
    placement; bin b holds items[sum(sizes[:b]):sum(sizes[:b + 1])]. No per-item Python
    objects outlive the call, so planning a million rows leaves only arrays behind."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if np.any(lengths > seq_len):
        bad = int(np.argmax(lengths > seq_len))
        raise ValueError(f"item {bad} has length {int(lengths[bad])} > seq_len={seq_len}")
    order = np.argsort(-lengths, kind="stable")
    bin_of = np.empty(len(order), np.int64)
    room: list[int] = []
    for position, length in enumerate(lengths[order].tolist()):
        for target, space in enumerate(room):
            if space >= length:
                break
        else:
            target = len(room)
            room.append(seq_len)
        room[target] -= length
        bin_of[position] = target
    grouping = np.argsort(bin_of, kind="stable")
    return order[grouping], np.bincount(bin_of, minlength=len(room)).astype(np.int64)


def split_bins(items: np.ndarray, sizes: np.ndarray) -> list[list[int]]:
    return [chunk.tolist() for chunk in np.split(items, np.cumsum(sizes)[:-1])] if len(sizes) else []


def first_fit_decreasing(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """ffd_bins as lists: bins (lists of indices into `lengths`) in order of opening."""
    return split_bins(*ffd_bins(lengths, seq_len))


def plan_packing_arrays(lengths: Sequence[int], seq_len: int,
                        window: int) -> tuple[np.ndarray, np.ndarray]:
    """First-fit-decreasing inside consecutive windows of `window` items, as (items, sizes)
    (see ffd_bins). The window bounds how far packing reorders the (already shuffled)
    stream, and keeps the cost linear in the number of rows."""
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    lengths = np.asarray(lengths, dtype=np.int64)
    items, sizes = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start in range(0, len(lengths), window):
        chunk_items, chunk_sizes = ffd_bins(lengths[start:start + window], seq_len)
        items.append(chunk_items + start)
        sizes.append(chunk_sizes)
    return np.concatenate(items), np.concatenate(sizes)


def plan_packing(lengths: Sequence[int], seq_len: int, window: int) -> list[list[int]]:
    """plan_packing_arrays as lists: bins of indices into `lengths`."""
    return split_bins(*plan_packing_arrays(lengths, seq_len, window))


def pack_rows(rows: Sequence[Mapping], seq_len: int, pad_id: int,
              window: int = 1000) -> tuple[dict[str, np.ndarray], list[list[int]]]:
    """Packing mode on an in-memory list: `([S, seq_len] batch, bins of row indices)`."""
    lengths = [check_row(row, index, seq_len) for index, row in enumerate(rows)]
    bins = plan_packing(lengths, seq_len, window)
    sequences = [pack_sequence([rows[i] for i in b], seq_len, pad_id, b) for b in bins]
    return stack_sequences(sequences, seq_len, pad_id), bins


def non_pad_fraction(batch: Mapping[str, np.ndarray]) -> float:
    """Share of positions holding a real token (segment id != 0): packing efficiency."""
    segment_ids = np.asarray(batch["segment_ids"])
    return float(np.count_nonzero(segment_ids)) / max(1, segment_ids.size)
