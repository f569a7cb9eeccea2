"""The training loader: tokenized rows -> this process's share of each global batch.

Order of operations, and why it makes resume exact
--------------------------------------------------
1. shuffle + epochs: every epoch reads the rows in its own permutation, the one
   `grain.MapDataset.range(N).shuffle(seed).repeat(E)` gives (Grain's index shuffle,
   reseeded with seed + epoch; computed with `index_shuffle` directly for speed).
2. epochs -> sequences: each epoch's shuffled rows become a list of sequences, one row
   each (padding mode) or packed first-fit-decreasing inside windows of `pack_window`
   rows (packing mode, bins then shuffled by a seeded permutation). An epoch is padded
   with empty sequences to a whole number of global batches (or, with
   `drop_remainder`, its last partial batch is dropped and logged). So every epoch is a
   whole number of steps, known before training starts: `num_steps` is exact.
3. shard: global batch `s` is sequences `[s*G, (s+1)*G)` of that stream; process `p`
   of `P` reads only `[s*G + p*G/P, s*G + (p+1)*G/P)`. Concatenating the processes'
   local batches in process order gives exactly the single-process global batch.
4. pack/batch: a Grain map reads the rows of each local sequence from the source and
   lays them out (packing.pack_sequence); `.batch(G/P)` stacks them into `[G/P, T]`.

Steps 1-3 form the *plan*: a pure function of the row lengths and the config, computed
up front (about 3 s for 60K rows x 2 epochs, linear in rows x epochs). Batch `s` depends only on the plan and
`s`, never on what was read before, so the whole iterator state is one integer, the next
step. It does not depend on the process count either: a run saved with 8 processes
resumes with 1. The state also carries a fingerprint of the plan, so resuming against
different data, seed, batch size or packing settings fails loudly instead of silently
training on other batches. Packing before sharding (rather than Grain's per-process
packing iterators) is what makes the union over processes equal the single-process batch.

Epochs and steps: `pipeline.num_steps` (for the LR schedule) and
`pipeline.steps_per_epoch` are exact before the first batch; a batch never mixes two
epochs; `pipeline.plan.epoch_progress(step)` is the fractional epoch for progress bars.
With packing the steps of each epoch differ slightly (each epoch packs its own order).

Checkpointing with Orbax: the state is a small JSON dict, saved as its own item, e.g.
`ocp.args.Composite(..., data=ocp.args.JsonSave(it.get_state()))` and restored with
`ocp.args.JsonRestore()`, then `pipeline.iterator(state)`. (Grain's own orbax handler
writes one file per process index and count, which would tie a checkpoint to a
process count; this state does not need that.)
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import logging
from typing import Mapping, Optional, Sequence

import grain
import numpy as np
from grain.experimental import index_shuffle

from derta_jax.data.packing import (check_row, empty_sequence, pack_sequence,
                                    plan_packing_arrays)

log = logging.getLogger(__name__)

STATE_FORMAT = "derta_jax.loader_state"
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """What determines the batches (the `data` section of a config)."""

    seq_len: int
    global_batch_size: int  # sequences per step, summed over all processes
    num_epochs: int = 1
    seed: int = 0
    packing: bool = False
    pad_id: int = 0
    shuffle: bool = True
    pack_window: int = 1000  # rows packed together (first-fit-decreasing) at a time
    drop_remainder: bool = False  # drop each epoch's last partial batch instead of padding it

    def validate(self) -> "LoaderConfig":
        def check(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ValueError(f"data.{field}={getattr(self, field)!r}: {why}")

        for field in ("seq_len", "global_batch_size", "num_epochs", "pack_window"):
            value = getattr(self, field)
            check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                  field, "must be a positive integer")
        check(isinstance(self.seed, int) and 0 <= self.seed < 2**32, "seed",
              "must be an integer in [0, 2**32)")
        check(isinstance(self.pad_id, int) and self.pad_id >= 0, "pad_id",
              "must be a non-negative integer")
        return self


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """Every global batch of the run, as row indices. Sequence `s` holds rows
    `row_ids[seq_offsets[s]:seq_offsets[s+1]]` (none: an all-padding filler sequence)."""

    row_ids: np.ndarray  # int64 [R]
    seq_offsets: np.ndarray  # int64 [S + 1], S = num_steps * global_batch_size
    epoch_first_step: tuple[int, ...]  # epoch e is steps [first[e], first[e + 1])
    global_batch_size: int
    num_tokens: int  # real (non-pad) tokens over the whole plan
    num_dropped_rows: int  # rows left out by drop_remainder, over all epochs

    @property
    def num_steps(self) -> int:
        return self.epoch_first_step[-1]

    @property
    def steps_per_epoch(self) -> tuple[int, ...]:
        first = self.epoch_first_step
        return tuple(b - a for a, b in zip(first[:-1], first[1:]))

    def sequence_rows(self, sequence: int) -> np.ndarray:
        return self.row_ids[self.seq_offsets[sequence]:self.seq_offsets[sequence + 1]]

    def epoch_of_step(self, step: int) -> int:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside 0..{self.num_steps - 1}")
        return bisect.bisect_right(self.epoch_first_step, step) - 1

    def epoch_progress(self, step: int) -> float:
        """Epochs completed before `step`, fractional (for progress bars and logs)."""
        if step >= self.num_steps:
            return float(len(self.epoch_first_step) - 1)
        epoch = self.epoch_of_step(step)
        return epoch + (step - self.epoch_first_step[epoch]) / self.steps_per_epoch[epoch]

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(np.int64(self.global_batch_size).tobytes())
        digest.update(np.ascontiguousarray(self.row_ids, np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.seq_offsets, np.int64).tobytes())
        return digest.hexdigest()[:32]


def epoch_orders(num_rows: int, num_epochs: int, seed: int, shuffle: bool) -> list[np.ndarray]:
    """Row indices of each epoch in reading order: the permutation of Grain's
    `MapDataset.range(num_rows).shuffle(seed).repeat(num_epochs)` (Grain's index shuffle,
    reseeded with seed + epoch), computed without Grain's per-element overhead."""
    if not shuffle:
        return [np.arange(num_rows, dtype=np.int64) for _ in range(num_epochs)]
    return [np.fromiter((index_shuffle(i, max_index=num_rows - 1,
                                       seed=(seed + epoch) % 2**32, rounds=4)
                         for i in range(num_rows)), np.int64, num_rows)
            for epoch in range(num_epochs)]


MIXING_EPOCHS = ("all_rows", "first_exhausted")


@dataclasses.dataclass(frozen=True)
class Mixing:
    """Weighted sources in one row space: source i is rows [offset_i, offset_i + sizes[i]).

    One epoch interleaves the sources by Grain's proportional mixing (`MapDataset.mix`:
    integer proportions, a fixed deterministic interleave), each source read in its own
    seeded permutation per pass. `epoch` says when an epoch ends:
      all_rows         when every source has given every row at least once; sources whose
                       weight asks for more rows than they have are read again, in a fresh
                       permutation per pass (upsampling);
      first_exhausted  Grain's own length: when the first source runs out, so no row
                       appears twice in an epoch (the others are partly read).
    """
    sizes: tuple[int, ...]
    weights: tuple[float, ...]
    epoch: str = "all_rows"

    def validate(self) -> "Mixing":
        if len(self.sizes) != len(self.weights) or not self.sizes:
            raise ValueError("mixing: one weight per source")
        if any(n <= 0 for n in self.sizes):
            raise ValueError(f"mixing: every source needs rows, got sizes {list(self.sizes)}")
        if any(not w > 0 for w in self.weights):
            raise ValueError(f"mixing: weights must be positive, got {list(self.weights)}")
        if self.epoch not in MIXING_EPOCHS:
            raise ValueError(f"data.mixture_epoch={self.epoch!r}: must be one of "
                             f"{', '.join(MIXING_EPOCHS)}")
        return self

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)


def grain_proportions(weights: Sequence[float]) -> tuple[int, ...]:
    """The integer proportions Grain's mix uses for float weights (smallest scaled to 100)."""
    scale = 100 / min(weights)
    return tuple(int(w * scale) for w in weights)


def grain_selection(positions: np.ndarray, proportions: Sequence[int]):
    """(source, index within source) of each position of Grain's proportional interleave,
    vectorised: the same integer recurrence as `MapDataset.mix`, for millions of positions
    at numpy speed (tests/test_data_sources.py checks it against Grain element by element)."""
    k = np.asarray(positions, np.int64)
    source = np.full(k.shape, -1, np.int64)
    key = np.zeros(k.shape, np.int64)
    remaining = int(sum(proportions))
    curr, curr1 = k, k + 1
    for i, p in enumerate(proportions):
        nxt = (curr * (remaining - p)) // remaining
        nxt1 = (curr1 * (remaining - p)) // remaining
        count = curr1 - nxt1
        hit = (source < 0) & ((curr - nxt) != count)
        source[hit], key[hit] = i, count[hit] - 1
        remaining -= p
        curr, curr1 = nxt, nxt1
    return source, key


def mixing_epoch_length(mixing: Mixing) -> int:
    """Rows in one epoch of the mixture (see Mixing.epoch)."""
    props, sizes = grain_proportions(mixing.weights), np.asarray(mixing.sizes, np.int64)
    total = sum(props)
    if mixing.epoch == "first_exhausted":  # Grain's: len(parent) / (weight / weight_sum)
        return int(min(n / (p / total) for n, p in zip(mixing.sizes, props)))
    length = int(max(-(-n * total // p) for n, p in zip(mixing.sizes, props)))
    while True:
        counts = np.bincount(grain_selection(np.arange(length), props)[0], minlength=len(props))
        short = sizes - counts
        if (short <= 0).all():
            return length
        length += int(max(-(-s * total // p) for s, p in zip(short, props) if s > 0))


def mixed_epoch_orders(mixing: Mixing, num_epochs: int, seed: int,
                       shuffle: bool) -> list[np.ndarray]:
    """Row ids (in the concatenated row space) of each epoch of the mixture, in order."""
    mixing.validate()
    props, offsets = grain_proportions(mixing.weights), mixing.offsets
    length = mixing_epoch_length(mixing)
    source, key = grain_selection(np.arange(length), props)
    orders = []
    for epoch in range(num_epochs):
        order = np.empty(length, np.int64)
        for i, size in enumerate(mixing.sizes):
            picked = source == i
            passes = -(-int(key[picked].max(initial=-1) + 1) // size)
            stream = np.concatenate(
                [np.random.default_rng([seed, epoch, i, p]).permutation(size) if shuffle
                 else np.arange(size) for p in range(max(passes, 1))])
            order[picked] = offsets[i] + stream[key[picked]]
        orders.append(order)
    return orders


def epoch_sequences(order: np.ndarray, lengths: np.ndarray, config: LoaderConfig,
                    epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's rows (in reading order) grouped into sequences, as (row ids, rows per
    sequence): sequence s is row_ids[sum(sizes[:s]):sum(sizes[:s + 1])]."""
    if not config.packing:
        return np.asarray(order, np.int64), np.ones(len(order), np.int64)
    items, sizes = plan_packing_arrays(lengths[order], config.seq_len, config.pack_window)
    rows = np.asarray(order, np.int64)[items]
    if config.shuffle:  # FFD puts long rows first in each window: mix the bins
        mix = np.random.default_rng([config.seed, epoch]).permutation(len(sizes))
        starts = np.cumsum(sizes) - sizes
        new_sizes = sizes[mix]
        offsets = np.repeat(starts[mix] - (np.cumsum(new_sizes) - new_sizes), new_sizes)
        rows, sizes = rows[np.arange(len(rows)) + offsets], new_sizes
    return rows, sizes


def build_plan(lengths: Sequence[int], config: LoaderConfig,
               mixing: Optional[Mixing] = None) -> DataPlan:
    """The full sequence stream of a run from the rows' lengths (pure, deterministic);
    with `mixing`, each epoch's rows are the weighted mixture's instead of one permutation."""
    config.validate()
    lengths = np.asarray(lengths, np.int64)
    if lengths.size == 0:
        raise ValueError("the data set has no rows")
    if mixing is not None and sum(mixing.sizes) != lengths.size:
        raise ValueError(f"mixing: sources of {sum(mixing.sizes)} rows, but {lengths.size} "
                         f"row lengths")
    too_long = np.flatnonzero(lengths > config.seq_len)
    if too_long.size:
        raise ValueError(f"row {int(too_long[0])}: field 'input_ids' has "
                         f"{int(lengths[too_long[0]])} tokens, more than "
                         f"seq_len={config.seq_len}")
    G = config.global_batch_size
    row_parts, size_parts = [], []
    first_step, dropped = [0], 0
    orders = (epoch_orders(len(lengths), config.num_epochs, config.seed, config.shuffle)
              if mixing is None else
              mixed_epoch_orders(mixing, config.num_epochs, config.seed, config.shuffle))
    for epoch, order in enumerate(orders):
        rows, sizes = epoch_sequences(order, lengths, config, epoch)
        extra = len(sizes) % G
        if extra and config.drop_remainder:
            if len(sizes) < G:
                raise ValueError(f"data.global_batch_size={G}: an epoch has only {len(sizes)} "
                                 f"sequences, and data.drop_remainder=True leaves no step")
            lost = int(sizes[len(sizes) - extra:].sum())
            sizes = sizes[:len(sizes) - extra]
            rows = rows[:len(rows) - lost]
            dropped += lost
            log.warning("epoch %d: drop_remainder leaves out the last %d sequences "
                        "(%d rows)", epoch, extra, lost)
        elif extra:  # all-padding filler sequences: no loss, no NaN
            sizes = np.concatenate([sizes, np.zeros(G - extra, np.int64)])
        row_parts.append(rows)
        size_parts.append(sizes)
        first_step.append(first_step[-1] + len(sizes) // G)
    row_ids = np.concatenate(row_parts)
    seq_offsets = np.concatenate([[0], np.cumsum(np.concatenate(size_parts))]).astype(np.int64)
    return DataPlan(row_ids=row_ids, seq_offsets=seq_offsets,
                    epoch_first_step=tuple(first_step), global_batch_size=G,
                    num_tokens=int(lengths[row_ids].sum()), num_dropped_rows=dropped)


def row_lengths(source: Sequence[Mapping], seq_len: int) -> np.ndarray:
    """Every row's length: from `source.lengths` (the token cache) or by checking rows."""
    lengths = getattr(source, "lengths", None)
    if lengths is not None:
        lengths = np.asarray(lengths, np.int64)
        for index in np.flatnonzero(lengths > seq_len)[:1]:
            check_row(source[int(index)], int(index), seq_len)  # raises, naming its source
        return lengths
    return np.asarray([check_row(source[i], i, seq_len) for i in range(len(source))], np.int64)


class DataPipeline:
    """This process's batches of a run. `source` is any random-access sequence of rows
    (a list of dicts or a TokenCache); rows may carry extra metadata, which is ignored."""

    def __init__(self, source: Sequence[Mapping], config: LoaderConfig, *,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 read_threads: int = 2, prefetch_batches: int = 4,
                 mixing: Optional[Mixing] = None):
        self.config = config.validate()
        if process_index is None or process_count is None:
            import jax  # only when the caller leaves it to the JAX runtime

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} outside 0..{process_count - 1}")
        if config.global_batch_size % process_count:
            raise ValueError(f"data.global_batch_size={config.global_batch_size}: must be "
                             f"divisible by the number of processes ({process_count})")
        self.source = source
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = config.global_batch_size // process_count
        self.plan = build_plan(row_lengths(source, config.seq_len), config, mixing)
        layout = (f"{self.plan.fingerprint()}|seq_len={config.seq_len}|pad_id={config.pad_id}"
                  f"|packing={config.packing}|source={getattr(source, 'key', None)!r}")
        self.fingerprint = hashlib.sha256(layout.encode("utf-8")).hexdigest()[:32]
        self._read_options = grain.ReadOptions(num_threads=read_threads,
                                               prefetch_buffer_size=prefetch_batches)
        local = grain.MapDataset.range(self.plan.num_steps * self.local_batch_size)
        local = local.map(self._global_sequence)
        local = local.map(self._read_sequence)
        self.dataset = local.batch(self.local_batch_size)

    @property
    def num_steps(self) -> int:
        return self.plan.num_steps

    @property
    def steps_per_epoch(self) -> tuple[int, ...]:
        return self.plan.steps_per_epoch

    @property
    def non_pad_fraction(self) -> float:
        """Share of all batch positions that hold a real token, over the whole run."""
        total = self.plan.num_steps * self.config.global_batch_size * self.config.seq_len
        return self.plan.num_tokens / total

    def _global_sequence(self, local_index: int) -> int:
        step, slot = divmod(local_index, self.local_batch_size)
        G = self.config.global_batch_size
        return step * G + self.process_index * self.local_batch_size + slot

    def _read_sequence(self, sequence: int) -> dict[str, np.ndarray]:
        rows = self.plan.sequence_rows(sequence)
        if rows.size == 0:
            return empty_sequence(self.config.seq_len, self.config.pad_id)
        return pack_sequence([self.source[int(r)] for r in rows], self.config.seq_len,
                             self.config.pad_id, [int(r) for r in rows])

    def iterator(self, state: Optional[Mapping] = None) -> "LoaderIterator":
        """Batches from the start, or from where `state` (from get_state) left off."""
        it = LoaderIterator(self)
        if state is not None:
            it.set_state(state)
        return it


class ConcatRows:
    """Several random-access row sources (token caches) as one: source i's row j is row
    `offsets[i] + j`. `lengths` and `key` combine theirs, so the loader plans and
    fingerprints the whole without reading a row."""

    def __init__(self, sources: Sequence[Sequence[Mapping]]):
        if not sources:
            raise ValueError("ConcatRows: no sources")
        self.sources = list(sources)
        self.sizes = tuple(len(s) for s in self.sources)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.key = "+".join(str(getattr(s, "key", None)) for s in self.sources)

    @property
    def lengths(self):
        parts = [getattr(s, "lengths", None) for s in self.sources]
        return None if any(p is None for p in parts) else np.concatenate(parts)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> Mapping:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        i = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.sources[i][index - int(self.offsets[i])]


class LoaderIterator:
    """Yields `[G/P, T]` numpy batch dicts; `get_state()` is a JSON-able dict."""

    def __init__(self, pipeline: DataPipeline, next_step: int = 0):
        self._pipeline = pipeline
        self._start(next_step)

    def _start(self, next_step: int) -> None:
        self._next_step = next_step
        remaining = self._pipeline.dataset[next_step:]
        self._batches = iter(remaining.to_iter_dataset(self._pipeline._read_options))

    @property
    def step(self) -> int:
        """The step of the batch that `next()` returns."""
        return self._next_step

    def __iter__(self) -> "LoaderIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._next_step >= self._pipeline.num_steps:
            raise StopIteration
        batch = next(self._batches)
        self._next_step += 1
        return batch

    def get_state(self) -> dict:
        return {"format": STATE_FORMAT, "version": STATE_VERSION,
                "next_step": self._next_step, "num_steps": self._pipeline.num_steps,
                "fingerprint": self._pipeline.fingerprint}

    def set_state(self, state: Mapping) -> None:
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state: field 'format' must be {STATE_FORMAT!r}, got "
                             f"{state.get('format') if isinstance(state, Mapping) else state!r}")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state: field 'version' is {state.get('version')!r}, "
                             f"this code reads version {STATE_VERSION}")
        if state.get("fingerprint") != self._pipeline.fingerprint:
            raise ValueError(
                f"loader state: field 'fingerprint' is {state.get('fingerprint')!r} but this "
                f"run's data plan is {self._pipeline.fingerprint!r}: the rows, seed, "
                f"seq_len, batch size, epochs or packing settings changed since it was saved")
        step = state.get("next_step")
        if not isinstance(step, int) or not 0 <= step <= self._pipeline.num_steps:
            raise ValueError(f"loader state: field 'next_step' is {step!r}, expected an "
                             f"integer in 0..{self._pipeline.num_steps}")
        self._start(step)
