"""Tests for the loader: padding/packing layout, the packing plan, the Grain pipeline
(shuffle, epochs, multi-process sharding, exact resume) and the token cache."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from derta_jax.data import packing, pipeline, token_cache
from derta_jax.data.packing import BATCH_DTYPES, BATCH_KEYS, ROW_KEYS
from derta_jax.data.pipeline import DataPipeline, LoaderConfig

REFUSAL_ID = 7


def make_row(rng, length, kind="helpful", vocab=50):
    """A contract-valid row: MLE (or RTO) positions from the last prompt token through
    the second-to-last token; the last token (EOS) is never supervised."""
    ids = rng.integers(1, vocab, length).astype(np.int32)
    prompt = int(rng.integers(1, length)) if length > 1 else 1
    loss = np.zeros(length, bool)
    loss[prompt - 1:length - 1] = True
    targets = np.zeros(length, np.int32)
    if kind == "rto":
        targets[loss] = REFUSAL_ID
    else:
        targets[:-1][loss[:-1]] = ids[1:][loss[:-1]]
    return {"input_ids": ids, "targets": targets, "loss_mask": loss,
            "rto_mask": loss.copy() if kind == "rto" else np.zeros(length, bool),
            "kind": kind}


def make_rows(seed, n, max_len=24, min_len=1):
    rng = np.random.default_rng(seed)
    return [make_row(rng, int(rng.integers(min_len, max_len + 1)),
                     kind=("rto" if i % 3 == 0 else "helpful")) for i in range(n)]


def all_batches(pipe, state=None):
    return list(pipe.iterator(state))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def segments(batch):
    """[(sequence index, segment id, {key: array of that segment})] in layout order."""
    out = []
    for s in range(batch["segment_ids"].shape[0]):
        seg = batch["segment_ids"][s]
        for sid in range(1, seg.max() + 1):
            where = seg == sid
            out.append((s, sid, {k: batch[k][s][where] for k in BATCH_KEYS}))
    return out


# ---------------------------------------------------------------- padding and packing

def test_pad_rows_gives_the_contract_exactly():
    row_a = {"input_ids": np.array([5, 6, 9], np.int32), "targets": np.array([0, 9, 0], np.int32),
             "loss_mask": np.array([0, 1, 0], bool), "rto_mask": np.zeros(3, bool)}
    row_b = {"input_ids": np.array([4, 3], np.int32), "targets": np.array([7, 0], np.int32),
             "loss_mask": np.array([1, 0], bool), "rto_mask": np.array([1, 0], bool)}
    batch = packing.pad_rows([row_a, row_b], seq_len=4, pad_id=1)
    assert {k: v.dtype for k, v in batch.items()} == {k: np.dtype(v) for k, v in BATCH_DTYPES.items()}
    np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 9, 1], [4, 3, 1, 1]])
    np.testing.assert_array_equal(batch["targets"], [[0, 9, 0, 0], [7, 0, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["rto_mask"], [[0, 0, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0], [0, 1, 0, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 0], [1, 1, 0, 0]])


def test_pack_rows_gives_the_contract_exactly():
    rows = [{"input_ids": np.array(ids, np.int32), "targets": np.array(t, np.int32),
             "loss_mask": np.array(m, bool), "rto_mask": np.array(r, bool)}
            for ids, t, m, r in [([10, 11, 12], [0, 12, 0], [0, 1, 0], [0, 0, 0]),
                                 ([20, 21], [7, 0], [1, 0], [1, 0]),
                                 ([30, 31, 32, 33], [0, 32, 33, 0], [0, 1, 1, 0], [0] * 4)]]
    batch, bins = packing.pack_rows(rows, seq_len=6, pad_id=0)
    # Longest first: row 2 (4 tokens) opens bin 0, row 0 (3) does not fit and opens bin 1,
    # row 1 (2) fits the first bin with room, bin 0.
    assert bins == [[2, 1], [0]]
    np.testing.assert_array_equal(batch["input_ids"], [[30, 31, 32, 33, 20, 21], [10, 11, 12, 0, 0, 0]])
    np.testing.assert_array_equal(batch["targets"], [[0, 32, 33, 0, 7, 0], [0, 12, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0, 1, 0], [0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["rto_mask"], [[0, 0, 0, 0, 1, 0], [0] * 6])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0]])
    assert packing.non_pad_fraction(batch) == 9 / 12


def test_packing_preserves_every_row_and_never_supervises_across_rows():
    rows = make_rows(seed=1, n=300, max_len=40)
    batch, bins = packing.pack_rows(rows, seq_len=48, pad_id=3, window=64)
    assert sorted(r for b in bins for r in b) == list(range(len(rows)))
    found = segments(batch)
    assert len(found) == len(rows)
    for (s, sid, seg), (b_index, b) in zip(found, [(i, b) for i, b in enumerate(bins)
                                                   for _ in b]):
        assert s == b_index
        row = rows[bins[s][sid - 1]]
        for key in ROW_KEYS:
            np.testing.assert_array_equal(seg[key], row[key], err_msg=key)
        np.testing.assert_array_equal(seg["positions"], np.arange(len(row["input_ids"])))
    pad = batch["segment_ids"] == 0
    assert np.all(batch["input_ids"][pad] == 3)
    assert not np.any(batch["loss_mask"][pad] | batch["rto_mask"][pad] | (batch["positions"][pad] != 0))
    # Segments are laid out 1, 2, ... left to right, padding only at the end.
    for seq in batch["segment_ids"]:
        real = seq[seq != 0]
        assert np.all(np.diff(real) >= 0) and np.all(np.diff(np.unique(real)) == 1)
        assert np.all(seq[len(real):] == 0)
    # An MLE target is always the next token of the same segment.
    mle = batch["loss_mask"][:, :-1] & ~batch["rto_mask"][:, :-1]
    assert np.all((batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1])[mle])
    assert np.all((batch["targets"][:, :-1] == batch["input_ids"][:, 1:])[mle])
    assert not np.any(batch["loss_mask"][:, -1] & (batch["segment_ids"][:, -1] == 0))


def slow_first_fit_decreasing(lengths, capacity):
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, used = [], []
    for i in order:
        for b in range(len(bins)):
            if used[b] + lengths[i] <= capacity:
                bins[b].append(i)
                used[b] += lengths[i]
                break
        else:
            bins.append([i])
            used.append(lengths[i])
    return bins


def test_first_fit_decreasing_matches_a_slow_reference():
    rng = np.random.default_rng(2)
    for _ in range(20):
        lengths = rng.integers(1, 33, int(rng.integers(1, 200))).tolist()
        assert packing.first_fit_decreasing(lengths, 32) == slow_first_fit_decreasing(lengths, 32)
    windowed = packing.plan_packing(lengths, 32, window=10)
    expected = [[start + i for i in b] for start in range(0, len(lengths), 10)
                for b in slow_first_fit_decreasing(lengths[start:start + 10], 32)]
    assert windowed == expected


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("targets"), "row 4 (train.jsonl:5): field 'targets' is missing"),
    (lambda r: r.update(targets=r["targets"][:-1]),
     "row 4 (train.jsonl:5): field 'targets' has length 4, expected 5 (the length of input_ids)"),
    (lambda r: r.update(loss_mask=r["loss_mask"].astype(np.int32)),
     "row 4 (train.jsonl:5): field 'loss_mask' must be bool, got int32"),
    (lambda r: r.update(input_ids=r["input_ids"].astype(np.float32)),
     "row 4 (train.jsonl:5): field 'input_ids' must hold integers, got float32"),
    (lambda r: r.update(rto_mask=np.ones(5, bool), loss_mask=np.zeros(5, bool)),
     "row 4 (train.jsonl:5): field 'rto_mask' is set where 'loss_mask' is not"),
    (lambda r: r.update(input_ids=np.arange(9, dtype=np.int32), targets=np.zeros(9, np.int32),
                        loss_mask=np.zeros(9, bool), rto_mask=np.zeros(9, bool)),
     "row 4 (train.jsonl:5): field 'input_ids' has 9 tokens, more than seq_len=8"),
])
def test_bad_rows_are_named_with_their_field(change, message):
    rows = make_rows(seed=3, n=6, min_len=5, max_len=5)
    rows[4]["source"] = "train.jsonl:5"
    change(rows[4])
    with pytest.raises(ValueError) as err:
        packing.pack_rows(rows, seq_len=8, pad_id=0)
    assert str(err.value).startswith(message)
    with pytest.raises(ValueError) as err:
        DataPipeline(rows, LoaderConfig(seq_len=8, global_batch_size=2), process_index=0,
                     process_count=1)
    assert str(err.value).startswith(message)


# ---------------------------------------------------------------- pipeline

def config(**changes):
    base = dict(seq_len=32, global_batch_size=4, num_epochs=2, seed=5)
    base.update(changes)
    return LoaderConfig(**base)


def rows_per_epoch(pipe):
    """Row ids read in each epoch, in reading order, from the plan."""
    plan, G = pipe.plan, pipe.config.global_batch_size
    out = []
    for e, steps in enumerate(plan.steps_per_epoch):
        first = plan.epoch_first_step[e] * G
        out.append([int(r) for s in range(first, first + steps * G) for r in plan.sequence_rows(s)])
    return out


def test_epoch_orders_are_grains_shuffle_then_repeat():
    import grain

    grain_order = grain.MapDataset.range(37).shuffle(seed=11).repeat(3)
    ours = np.concatenate(pipeline.epoch_orders(37, 3, seed=11, shuffle=True))
    assert ours.tolist() == [grain_order[i] for i in range(111)]


@pytest.mark.parametrize("packed", [False, True])
def test_every_epoch_reads_every_row_once_in_its_own_seeded_order(packed):
    rows = make_rows(seed=4, n=50)
    pipe = DataPipeline(rows, config(packing=packed, num_epochs=3), process_index=0, process_count=1)
    epochs = rows_per_epoch(pipe)
    assert [sorted(e) for e in epochs] == [list(range(50))] * 3
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    same = DataPipeline(rows, config(packing=packed, num_epochs=3), process_index=0, process_count=1)
    other = DataPipeline(rows, config(packing=packed, num_epochs=3, seed=6), process_index=0,
                         process_count=1)
    assert rows_per_epoch(same) == epochs
    assert rows_per_epoch(other)[0] != epochs[0]
    # The batches are those rows laid out: every segment is the planned row, unchanged.
    batches = all_batches(pipe)
    assert len(batches) == pipe.num_steps == sum(pipe.steps_per_epoch)
    read = [seg for b in batches for _, _, seg in segments(b)]
    assert len(read) == 150
    for seg, row_id in zip(read, [r for e in epochs for r in e]):
        for key in ROW_KEYS:
            np.testing.assert_array_equal(seg[key], rows[row_id][key])
    assert_batches_equal(batches, all_batches(same))
    unshuffled = DataPipeline(rows, config(packing=packed, shuffle=False), process_index=0,
                              process_count=1)
    if not packed:
        assert rows_per_epoch(unshuffled) == [list(range(50))] * 2


def test_packing_fills_sequences_better_than_padding():
    rows = make_rows(seed=5, n=200, max_len=30)
    padded = DataPipeline(rows, config(), process_index=0, process_count=1)
    packed = DataPipeline(rows, config(packing=True), process_index=0, process_count=1)
    assert packed.num_steps < padded.num_steps
    assert packed.non_pad_fraction > padded.non_pad_fraction
    measured = np.mean([packing.non_pad_fraction(b) for b in all_batches(packed)])
    assert packed.non_pad_fraction == pytest.approx(measured)


def test_epochs_are_whole_steps_padded_with_empty_sequences_or_dropped(caplog):
    rows = make_rows(seed=6, n=10)
    pipe = DataPipeline(rows, config(global_batch_size=4), process_index=0, process_count=1)
    assert pipe.steps_per_epoch == (3, 3)
    last_of_epoch0 = all_batches(pipe)[2]
    assert np.count_nonzero(last_of_epoch0["segment_ids"].max(axis=1)) == 2  # 10 = 4 + 4 + 2
    assert pipe.plan.epoch_of_step(2) == 0 and pipe.plan.epoch_of_step(3) == 1
    assert pipe.plan.epoch_progress(4) == pytest.approx(1 + 1 / 3)
    with pytest.raises(ValueError, match=r"^data.global_batch_size=16: an epoch has only 10 "
                       r"sequences, and data.drop_remainder=True leaves no step$"):
        DataPipeline(rows, config(global_batch_size=16, drop_remainder=True), process_index=0,
                     process_count=1)
    with caplog.at_level(logging.WARNING, logger="derta_jax.data.pipeline"):
        dropped = DataPipeline(rows, config(global_batch_size=4, drop_remainder=True),
                               process_index=0, process_count=1)
    assert dropped.steps_per_epoch == (2, 2) and dropped.plan.num_dropped_rows == 4
    assert [r.getMessage() for r in caplog.records] == [
        f"epoch {e}: drop_remainder leaves out the last 2 sequences (2 rows)" for e in (0, 1)]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("cross_epoch", [False, True])
def test_resume_from_saved_state_sees_exactly_the_same_batches(packed, cross_epoch):
    rows = make_rows(seed=7, n=40)
    cfg = config(packing=packed, global_batch_size=4, seq_len=24)
    uninterrupted = all_batches(DataPipeline(rows, cfg, process_index=0, process_count=1))
    pipe = DataPipeline(rows, cfg, process_index=0, process_count=1)
    stop_after = pipe.steps_per_epoch[0] + 1 if cross_epoch else 2
    assert pipe.plan.epoch_of_step(stop_after) == int(cross_epoch)
    it = pipe.iterator()
    first = [next(it) for _ in range(stop_after)]
    state = json.loads(json.dumps(it.get_state()))
    assert state["next_step"] == stop_after
    resumed = all_batches(DataPipeline(rows, cfg, process_index=0, process_count=1), state)
    assert_batches_equal(first + resumed, uninterrupted)
    # set_state on a running iterator rewinds it too.
    it.set_state({**state, "next_step": 1})
    assert_batches_equal([next(it)], uninterrupted[1:2])


@pytest.mark.parametrize("packed", [False, True])
def test_two_processes_read_halves_that_union_to_the_single_process_batch(packed):
    rows = make_rows(seed=8, n=70)
    cfg = config(packing=packed, global_batch_size=6)
    single = DataPipeline(rows, cfg, process_index=0, process_count=1)
    halves = [DataPipeline(rows, cfg, process_index=p, process_count=2) for p in range(2)]
    assert [h.local_batch_size for h in halves] == [3, 3]
    assert halves[0].num_steps == halves[1].num_steps == single.num_steps
    local = [all_batches(h) for h in halves]
    union = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*local)]
    assert_batches_equal(union, all_batches(single))
    # The state is independent of the process count: saved on 2 processes, resumed on 1.
    it = halves[1].iterator()
    next(it), next(it)
    assert_batches_equal(all_batches(single, it.get_state()), all_batches(single)[2:])


def test_loader_state_from_other_data_is_refused():
    rows = make_rows(seed=9, n=20)
    it = DataPipeline(rows, config(), process_index=0, process_count=1).iterator()
    state = it.get_state()
    other = DataPipeline(rows, config(seed=1), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="loader state: field 'fingerprint' is '[0-9a-f]+' but "
                       "this run's data plan is '[0-9a-f]+': the rows, seed, seq_len"):
        other.iterator(state)
    with pytest.raises(ValueError, match=r"loader state: field 'next_step' is 99, expected an "
                       r"integer in 0\.\.10"):
        it.set_state({**state, "next_step": 99})


def test_config_and_sharding_errors_name_the_field():
    rows = make_rows(seed=10, n=8)
    with pytest.raises(ValueError, match=r"^data.global_batch_size=6: must be divisible by "
                       r"the number of processes \(4\)$"):
        DataPipeline(rows, config(global_batch_size=6), process_index=0, process_count=4)
    with pytest.raises(ValueError, match=r"^data.seq_len=0: must be a positive integer$"):
        DataPipeline(rows, config(seq_len=0), process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"^data.seed=-1: must be an integer in \[0, 2\*\*32\)$"):
        DataPipeline(rows, config(seed=-1), process_index=0, process_count=1)


def test_loader_state_round_trips_through_an_orbax_checkpoint_manager(tmp_path):
    import orbax.checkpoint as ocp

    rows = make_rows(seed=11, n=30)
    pipe = DataPipeline(rows, config(packing=True), process_index=0, process_count=1)
    it = pipe.iterator()
    next(it), next(it), next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=ocp.args.JsonSave(it.get_state())))
        manager.wait_until_finished()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(3, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    assert_batches_equal(all_batches(pipe, dict(restored["data"])), all_batches(pipe)[3:])


# ---------------------------------------------------------------- token cache

def test_token_cache_round_trip_is_exact_and_feeds_the_pipeline(tmp_path):
    rows = make_rows(seed=12, n=40)
    cache = token_cache.write_token_cache(tmp_path, "tok=abc|max=32", iter(rows))
    assert len(cache) == 40 and sorted(cache.meta) == ["kind"]
    assert isinstance(cache.meta["kind"][0], np.memmap)  # strings stay on disk
    assert isinstance(cache.arrays["input_ids"], np.memmap)
    np.testing.assert_array_equal(cache.lengths, [len(r["input_ids"]) for r in rows])
    for i, row in enumerate(rows):
        got = cache[i]
        assert got["kind"] == row["kind"]
        for key in ROW_KEYS:
            assert got[key].dtype == row[key].dtype
            np.testing.assert_array_equal(got[key], row[key])
    reopened = token_cache.load_or_build_cache(tmp_path, "tok=abc|max=32",
                                               lambda: pytest.fail("must not rebuild"))
    assert reopened.path == cache.path == token_cache.cache_dir_for(tmp_path, "tok=abc|max=32")
    with pytest.raises(ValueError, match=r"^row \d+ \(train.jsonl:\d+\): field 'input_ids' "
                       r"has 2\d tokens, more than seq_len=20"):
        DataPipeline(token_cache.write_token_cache(tmp_path, "with sources", [
            {**row, "source": f"train.jsonl:{i + 1}"} for i, row in enumerate(rows)]),
            config(seq_len=20), process_index=0, process_count=1)
    cfg = config(packing=True)
    from_cache = DataPipeline(reopened, cfg, process_index=0, process_count=1)
    from_list = DataPipeline(rows, cfg, process_index=0, process_count=1)
    assert_batches_equal(all_batches(from_cache), all_batches(from_list))


def corrupt_truncate(path):
    with open(path / "targets.npy", "r+b") as f:
        f.truncate(os.path.getsize(path / "targets.npy") - 8)


def corrupt_key(path):
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "key": "another key"}))


@pytest.mark.parametrize("corrupt, reason", [
    (corrupt_key, "manifest.json: field 'key' is 'another key', expected 'K'; rebuilding"),
    (corrupt_truncate, "targets.npy: unreadable"),
    (lambda p: (p / "manifest.json").write_text("{"), "manifest.json: not valid JSON"),
    (lambda p: (p / "offsets.npy").unlink(), "offsets.npy: unreadable"),
])
def test_mismatched_or_corrupt_cache_is_rebuilt_with_a_logged_reason(tmp_path, caplog, corrupt,
                                                                     reason):
    rows = make_rows(seed=13, n=10)
    path = token_cache.write_token_cache(tmp_path, "K", rows[:4]).path
    corrupt(path)
    with caplog.at_level(logging.INFO, logger="derta_jax.data.token_cache"):
        cache = token_cache.load_or_build_cache(tmp_path, "K", lambda: iter(rows))
    assert any(reason in r.getMessage() for r in caplog.records), caplog.text
    assert len(cache) == 10
    np.testing.assert_array_equal(cache[9]["input_ids"], rows[9]["input_ids"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_failed_build_leaves_the_previous_cache_untouched(tmp_path):
    rows = make_rows(seed=14, n=10)
    token_cache.write_token_cache(tmp_path, "K", rows[:3])

    def broken():
        yield from rows[:5]
        raise RuntimeError("tokenizer crashed")

    with pytest.raises(RuntimeError, match="tokenizer crashed"):
        token_cache.write_token_cache(tmp_path, "K", broken())
    assert len(token_cache.TokenCache(token_cache.cache_dir_for(tmp_path, "K"), "K")) == 3
    assert len(list(tmp_path.iterdir())) == 1


def test_a_build_finishing_second_keeps_the_cache_another_process_completed(tmp_path, caplog):
    rows = make_rows(seed=19, n=6)

    def slow_build():
        yield from rows[:2]
        token_cache.write_token_cache(tmp_path, "K", rows[:3])  # the other process wins
        yield from rows[2:]

    with caplog.at_level(logging.INFO, logger="derta_jax.data.token_cache"):
        cache = token_cache.write_token_cache(tmp_path, "K", slow_build())
    assert "was completed by another process; using it" in caplog.text
    assert len(cache) == 3
    assert [p.name for p in tmp_path.iterdir()] == [cache.path.name]


def test_a_build_killed_midway_is_never_read_and_is_rebuilt(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        from derta_jax.data import token_cache
        def rows():
            for i in range(1000):
                n = 5
                yield {{"input_ids": np.arange(n, dtype=np.int32), "targets": np.zeros(n, np.int32),
                       "loss_mask": np.zeros(n, bool), "rto_mask": np.zeros(n, bool)}}
                if i == 3:
                    print("writing", flush=True)
                    time.sleep(60)
        token_cache.write_token_cache({str(tmp_path)!r}, "K", rows())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()
        proc.wait()
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-")
    rows = make_rows(seed=15, n=7)
    cache = token_cache.load_or_build_cache(tmp_path, "K", lambda: iter(rows))
    assert len(cache) == 7
    assert leftovers[0].exists()  # a partial build is only removed once idle for an hour
    os.utime(leftovers[0], (0, 0))
    for f in leftovers[0].iterdir():
        os.utime(f, (0, 0))
    token_cache.write_token_cache(tmp_path, "K", rows)
    assert not leftovers[0].exists()


def test_files_digest_changes_with_any_byte_and_with_the_split_between_files(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    (tmp_path / "b").write_bytes(b"def")
    digest = token_cache.files_digest([tmp_path / "a", tmp_path / "b"])
    (tmp_path / "c").write_bytes(b"ab")
    (tmp_path / "d").write_bytes(b"cdef")
    assert token_cache.files_digest([tmp_path / "c", tmp_path / "d"]) != digest
    (tmp_path / "b").write_bytes(b"deg")
    assert token_cache.files_digest([tmp_path / "a", tmp_path / "b"]) != digest


def test_cache_refuses_rows_with_differing_metadata_fields(tmp_path):
    rows = make_rows(seed=16, n=3)
    del rows[2]["kind"]
    with pytest.raises(ValueError, match=r"^row 2: string fields \[\] differ from the first "
                       r"row's \['kind'\]$"):
        token_cache.write_token_cache(tmp_path, "K", rows)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- packing == padding, per row

def stand_in_logits(params, input_ids, positions, segment_ids):
    """One attention layer that, like the real model, keeps attention inside a segment
    (causal, same segment id) and reads positions per row. Independent of derta_jax.models."""
    import jax
    import jax.numpy as jnp

    x = params["embed"][input_ids] + params["pos"][positions]
    q, k, v = (x @ params[name] for name in ("wq", "wk", "wv"))
    T = input_ids.shape[1]
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & jnp.tril(jnp.ones((T, T), bool))
    scores = jnp.where(allowed, q @ jnp.swapaxes(k, 1, 2) / np.sqrt(q.shape[-1]), -1e30)
    x = x + jax.nn.softmax(scores, axis=-1) @ v
    return jnp.tanh(x @ params["w1"]) @ params["out"]


def per_row_nll(logits, batch):
    """{(sequence, segment): summed NLL over the segment's supervised positions}."""
    import jax

    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1))
    picked = np.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    out = {}
    for s in range(batch["segment_ids"].shape[0]):
        for sid in range(1, batch["segment_ids"][s].max() + 1):
            where = (batch["segment_ids"][s] == sid) & batch["loss_mask"][s]
            out[s, sid] = -picked[s][where].sum()
    return out


def packed_vs_padded_losses(logits_fn, rows, seq_len):
    padded = packing.pad_rows(rows, seq_len, pad_id=0)
    packed, bins = packing.pack_rows(rows, seq_len, pad_id=0, window=len(rows))
    # Fill up with all-padding sequences (as the loader does at the end of an epoch): one
    # compiled shape for both batches, and the fillers' logits must be finite so that a
    # masked loss over them is 0, not NaN.
    fillers = padded["input_ids"].shape[0] - packed["input_ids"].shape[0]
    assert fillers > 0
    packed = {k: np.concatenate([packed[k], packing.stack_sequences(
        [packing.empty_sequence(seq_len, 0)] * fillers, seq_len, 0)[k]]) for k in packed}
    logits = {name: np.asarray(logits_fn(b)) for name, b in (("pad", padded), ("pack", packed))}
    assert np.all(np.isfinite(logits["pack"]))
    nll_pad = per_row_nll(logits["pad"], padded)
    nll_pack = per_row_nll(logits["pack"], packed)
    row_of = {(s, i + 1): r for s, b in enumerate(bins) for i, r in enumerate(b)}
    got = np.array([nll_pack[key] for key in sorted(row_of, key=row_of.get)])
    want = np.array([nll_pad[r, 1] for r in range(len(rows))])
    return got, want


def test_packing_gives_the_same_per_row_losses_as_padding_with_a_stand_in_model():
    import jax

    rows = make_rows(seed=17, n=12, max_len=14, min_len=2)
    keys = jax.random.split(jax.random.key(0), 7)
    shapes = {"embed": (50, 16), "pos": (16, 16), "wq": (16, 16), "wk": (16, 16),
              "wv": (16, 16), "w1": (16, 32), "out": (32, 50)}
    params = {name: jax.random.normal(key, shape) for key, (name, shape) in zip(keys, shapes.items())}
    forward = jax.jit(stand_in_logits)
    logits_fn = lambda b: forward(params, b["input_ids"], b["positions"], b["segment_ids"])
    got, want = packed_vs_padded_losses(logits_fn, rows, seq_len=16)
    assert np.all(want > 0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The test can fail: positions running on across packed rows change the losses.
    shifted = lambda b: forward(params, b["input_ids"],
                                        np.broadcast_to(np.arange(16), b["positions"].shape),
                                        b["segment_ids"])
    got, want = packed_vs_padded_losses(shifted, rows, seq_len=16)
    assert not np.allclose(got, want, rtol=1e-5)


def test_packing_gives_the_same_per_row_losses_as_padding_with_the_real_transformer():
    from flax import nnx

    from derta_jax.models.config import ModelConfig
    from derta_jax.models.transformer import Transformer

    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    model = Transformer(cfg, rngs=nnx.Rngs(0))

    @nnx.jit
    def forward(model, input_ids, positions, segment_ids):
        hidden, _ = model(input_ids, positions, segment_ids)
        return model.logits(hidden)

    logits_fn = lambda b: forward(model, b["input_ids"], b["positions"], b["segment_ids"])

    rows = make_rows(seed=18, n=10, max_len=14, min_len=2)
    got, want = packed_vs_padded_losses(logits_fn, rows, seq_len=16)
    np.testing.assert_allclose(got, want, rtol=1e-5)
