"""data.sources: TFDS data sets, Parquet and gs:// files, weighted mixing.

Pinned here: a TFDS data set built by `python -m derta_jax.data.tfds_build` gives the same
batches as the JSONL it was built from (and Parquet and gs:// copies give the same rows);
the mixing interleave equals Grain's `MapDataset.mix` element by element and keeps the
weights; 2 processes read disjoint halves whose union is the 1-process batch; bad sources
fail with one message naming the entry. Training from TFDS (losses, SIGKILL resume) is in
tests/test_train_tfds.py.
"""

from __future__ import annotations

import dataclasses
import json

import grain
import numpy as np
import pytest

from derta_jax.data import formats, mixture, sources, tfds_build, tfds_format
from derta_jax.data.pipeline import (MIXING_EPOCHS, ConcatRows, DataPipeline, LoaderConfig,
                                     Mixing, grain_proportions, grain_selection,
                                     mixed_epoch_orders, mixing_epoch_length)
from derta_jax.train.config import ConfigError, tiny_config, validate
from derta_jax.train.data import build_training_data
from tests.fixtures_gcs import fake_gcs  # noqa: F401  (a fixture)
from tests.fixtures_tfds import NUM_HELPFUL, NUM_SAFETY, world  # noqa: F401  (a fixture)

def _config(world, workdir, **data):
    c = tiny_config()
    c.workdir = str(workdir)
    c.data.update(synthetic=False, tokenizer=world["tokenizer"], num_safety=NUM_SAFETY,
                  max_length=128, tfds_data_dir=world["data_dir"])
    c.data.update(**data)
    c.train.update(batch_size=8, num_epochs=2)
    return c


def _batches(config, workdir, steps=None, process_index=0, process_count=1):
    data = build_training_data(config, workdir, process_index=process_index,
                               process_count=process_count)
    it = data.pipeline.iterator()
    steps = data.pipeline.num_steps if steps is None else steps
    return [next(it) for _ in range(steps)], data


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_tfds_mixture_gives_the_batches_of_the_jsonl_it_was_built_from(world, tmp_path):
    from_files, _ = _batches(_config(world, tmp_path / "a", triples=world["triples"],
                                     helpful=world["helpful"]), tmp_path / "a")
    config = _config(world, tmp_path / "b", sources="tfds:derta_mixture/derta:train")
    validate(config)
    from_tfds, data = _batches(config, tmp_path / "b")
    _assert_same_batches(from_files, from_tfds)
    assert data.report["rows"] == NUM_HELPFUL + NUM_SAFETY
    # a second run reads the token cache: no tokenisation report, the same batches
    again, data = _batches(config, tmp_path / "b")
    _assert_same_batches(from_files, again)
    assert "truncated_rows" not in data.report


def test_tfds_records_are_the_mixture_rows_in_order_with_provenance(world):
    import tensorflow_datasets as tfds

    split = tfds_format.open_split("derta_mixture/derta", "train", world["data_dir"])
    triples = formats.read_triples(world["triples"]).rows
    helpful = formats.read_helpful(world["helpful"]).rows
    expected = mixture.build_mixture_rows(triples, helpful, "derta", 0, NUM_SAFETY).rows
    assert tuple(split.rows()) == expected
    info = tfds.builder("derta_mixture/derta", data_dir=world["data_dir"]).info
    provenance = info.metadata["provenance"]
    assert provenance["recipe"] == "derta" and provenance["seed"] == 0
    assert provenance["rows"] == len(expected)
    assert provenance["counts"] == {"helpful": NUM_HELPFUL, "rto": NUM_SAFETY // 2,
                                    "harmful_prefix": NUM_SAFETY // 2}
    assert [i["sha256"] for i in provenance["inputs"]] == [
        formats.file_sha256(world["triples"]), formats.file_sha256(world["helpful"])]


def _reference_rows(world, path):
    """The mixture written in the reference format (the JSONL a user would train from)."""
    triples = formats.read_triples(world["triples"]).rows
    helpful = formats.read_helpful(world["helpful"]).rows
    built = mixture.build_mixture(triples, helpful, "derta", 0,
                                  mixture.make_template("reference"), NUM_SAFETY)
    mixture.write_reference_jsonl(built.examples, str(path))
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_parquet_and_gcs_copies_give_the_rows_of_the_local_jsonl(world, tmp_path, fake_gcs):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from etils import epath

    jsonl = tmp_path / "rows.jsonl"
    rows = _reference_rows(world, jsonl)
    # Parquet with other column names and a real boolean column, mapped by the field flags
    table = pa.table({"p": [r["prefix"] for r in rows], "t": [r["text"] for r in rows],
                      "is_rto": [r["safe"] == "true" for r in rows]})
    parquet = tmp_path / "rows.parquet"
    pq.write_table(table, parquet)
    epath.Path("gs://bucket/rows.jsonl").write_bytes(jsonl.read_bytes())
    fields = formats.ReferenceFields(prefix="p", text="t", safe="is_rto")
    local = formats.read_reference(str(jsonl)).rows
    strip = lambda rs: [dataclasses.replace(r, source="") for r in rs]  # noqa: E731
    assert strip(formats.read_reference(str(parquet), fields).rows) == strip(local)
    assert strip(formats.read_reference("gs://bucket/rows.jsonl").rows) == strip(local)
    assert formats.read_reference(str(parquet), fields).rows[4].source == f"{parquet}:5"
    # as training sources: the same batches from the local file and its gs:// copy
    a, _ = _batches(_config(world, tmp_path / "a", sources=str(jsonl)), tmp_path / "a", steps=3)
    b, _ = _batches(_config(world, tmp_path / "b", sources="gs://bucket/rows.jsonl"),
                    tmp_path / "b", steps=3)
    _assert_same_batches(a, b)


def test_tfds_build_of_parquet_rows_with_a_column_mapping(world, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    helpful = [json.loads(line) for line in open(world["helpful"], encoding="utf-8")]
    pq.write_table(pa.table({"prompt": [r["instruction"] for r in helpful],
                             "completion": [r["output"] for r in helpful]}),
                   tmp_path / "h.parquet")
    status = tfds_build.main(["tfds_build", "--name=my_sft", f"--helpful={tmp_path}/h.parquet",
                              "--instruction_field=prompt", "--output_field=completion",
                              f"--data_dir={tmp_path}/d"])
    assert status == 0
    rows = list(tfds_format.open_split("my_sft", "train", f"{tmp_path}/d").rows())
    assert [(r.question, r.response, r.kind) for r in rows] == [
        (h["instruction"], h["output"], "helpful") for h in helpful]
    # a mapped column the file lacks: one line naming the file and the column, status 1
    status = tfds_build.main(["tfds_build", "--name=my_sft2", f"--helpful={tmp_path}/h.parquet",
                              f"--data_dir={tmp_path}/d"])
    assert status == 1
    assert list((tmp_path / "d" / "my_sft2").iterdir()) == []  # no version, no staging left


def test_tfds_build_overwrite_replaces_the_version_whole(world, tmp_path):
    lines = open(world["helpful"], encoding="utf-8").read().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:30]) + "\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[30:40]) + "\n", encoding="utf-8")
    build = ["tfds_build", "--name=sft", f"--data_dir={tmp_path}/d"]
    assert tfds_build.main(build + [f"--helpful={tmp_path}/a.jsonl"]) == 0
    assert tfds_build.main(build + [f"--helpful={tmp_path}/b.jsonl", "--overwrite"]) == 0
    split = tfds_format.open_split("sft", "train", f"{tmp_path}/d")
    assert [r.question for r in split.rows()] == [json.loads(x)["instruction"]
                                                  for x in lines[30:40]]
    assert sorted(p.name for p in (tmp_path / "d" / "sft").iterdir()) == ["1.0.0"]
    # a small shard size splits the split into several ArrayRecord files, read in order
    result = tfds_build.write_dataset(
        "sharded", "1.0.0", None, f"{tmp_path}/d",
        lambda: iter(split.rows()), {"note": "test"}, shard_rows=3)
    assert result.rows == 10
    assert len(list((tmp_path / "d" / "sharded" / "1.0.0").glob("*.array_record-*"))) == 4
    resplit = tfds_format.open_split("sharded", "train", f"{tmp_path}/d")
    assert list(resplit.rows()) == list(split.rows())


def test_tfds_build_refuses_an_existing_version_and_bad_flags(world, tmp_path, capsys):
    args = ["tfds_build", f"--triples={world['triples']}", f"--helpful={world['helpful']}",
            "--recipe=derta", f"--num_safety={NUM_SAFETY}", f"--data_dir={world['data_dir']}"]
    for extra, message in (
            ([], "exists; pass --overwrite"),
            (["--name=Bad-Name"], "--name=Bad-Name: must be snake_case"),
            (["--version=1"], "--version=1: must be X.Y.Z"),
            (["--num_safety=3"], "--num_safety=3"),
            (["--reference=" + world["helpful"]], "not with --recipe")):
        with pytest.raises(SystemExit) as exit_:
            tfds_build.main(args + extra)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("entry, message", [
    ("tfds:nope:train", "no such data set"),
    ("tfds:derta_mixture/derta:validation", "no split 'validation'; the data set has train"),
    ("missing.jsonl", "missing.jsonl: no such file"),
    ("s3://bucket/x.jsonl", "cannot be read"),  # no s3fs (or no credentials)
])
def test_a_source_that_cannot_be_read_is_one_config_error(world, tmp_path, entry, message):
    config = _config(world, tmp_path, sources=entry)
    with pytest.raises(ConfigError) as err:
        build_training_data(config, tmp_path, process_index=0, process_count=1)
    assert message in str(err.value) and entry in str(err.value)
    if entry.startswith("tfds:nope"):
        assert "prepared there: derta_mixture/derta:1.0.0" in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("a.jsonl@0.5, b.jsonl", "give every source a weight (@W) or none"),
    ("a.jsonl@-1", "weight '-1' is not a positive number"),
    ("a.jsonl@x", "weight 'x' is not a positive number"),
    ("a.jsonl@nan", "weight 'nan' is not a positive number"),
    ("tfds:", "no data set name"),
    ("tfds:a:1.0.0:train:x", "expected tfds:NAME"),
])
def test_bad_source_entries_are_named(text, message):
    with pytest.raises(sources.SourceError) as err:
        sources.parse_sources(text)
    assert message in str(err.value)
    config = tiny_config()
    config.data.update(synthetic=False, sources=text)
    with pytest.raises(ConfigError, match="data.sources"):
        validate(config)


def test_source_entries_parse():
    specs = sources.parse_sources("tfds:derta_mixture/derta:train@0.3, tfds:my_sft@2,"
                                  "tfds:a/b:1.2.0:test[:10%]@1, gs://b/x.jsonl@1,"
                                  " helpful:h.parquet@0.5")
    assert [(s.kind, s.location, s.split, s.weight) for s in specs] == [
        ("tfds", "derta_mixture/derta", "train", 0.3), ("tfds", "my_sft", "train", 2.0),
        ("tfds", "a/b:1.2.0", "test[:10%]", 1.0), ("reference", "gs://b/x.jsonl", "", 1.0),
        ("helpful", "h.parquet", "", 0.5)]


def test_weights_with_inline_data_are_refused():
    config = tiny_config()  # synthetic data
    config.data.sources = "tfds:x:train@1"
    with pytest.raises(ConfigError, match="weights mix the sources named there only"):
        validate(config)


@pytest.mark.parametrize("weights", [(0.3, 0.7), (1, 1, 1), (0.05, 0.95), (2.5, 0.1, 7.0)])
def test_mixing_interleave_is_grains(weights):
    proportions = grain_proportions(weights)
    parents = [grain.MapDataset.range(10**6 * i, 10**6 * (i + 1)) for i in range(len(weights))]
    mixed = grain.MapDataset.mix(parents, list(weights))
    n = 2000
    want = np.array([mixed[i] for i in range(n)])
    source, key = grain_selection(np.arange(n), proportions)
    np.testing.assert_array_equal(source * 10**6 + key, want)
    # and Grain's length is the first_exhausted epoch
    sizes = (50, 30, 70)[:len(weights)]
    grain_length = len(grain.MapDataset.mix([grain.MapDataset.range(s) for s in sizes],
                                            list(weights)))
    assert mixing_epoch_length(Mixing(sizes, weights, "first_exhausted")) == grain_length


@pytest.mark.parametrize("epoch", MIXING_EPOCHS)
def test_mixed_epochs_keep_weights_and_cover_rows(epoch):
    sizes, weights = (500, 3000, 200), (0.2, 0.5, 0.3)
    mixing = Mixing(sizes, weights, epoch)
    orders = mixed_epoch_orders(mixing, 2, seed=3, shuffle=True)
    offsets = mixing.offsets
    for order in orders:
        which = np.searchsorted(offsets, order, side="right") - 1
        counts = np.bincount(which, minlength=3)
        np.testing.assert_allclose(counts / counts.sum(), weights, atol=0.01)
        for i, size in enumerate(sizes):
            rows = order[which == i] - offsets[i]
            seen = np.unique(rows)
            if epoch == "all_rows":
                assert seen.size == size  # every row of every source, the small ones again
            else:
                assert seen.size == rows.size  # no row twice
    assert not np.array_equal(orders[0], orders[1])  # each epoch its own permutations
    np.testing.assert_array_equal(orders[0], mixed_epoch_orders(mixing, 1, 3, True)[0])


def _rows(n, base):
    return [{"input_ids": np.arange(base, base + 3 + i % 5, dtype=np.int32),
             "targets": np.zeros(3 + i % 5, np.int32),
             "loss_mask": np.ones(3 + i % 5, bool), "rto_mask": np.zeros(3 + i % 5, bool)}
            for i in range(n)]


@pytest.mark.parametrize("packing", [False, True])
def test_two_processes_read_disjoint_halves_of_the_mixed_batch(packing):
    source = ConcatRows([_rows(30, 1000), _rows(200, 5000)])
    mixing = Mixing(source.sizes, (0.25, 0.75))
    config = LoaderConfig(seq_len=16, global_batch_size=8, num_epochs=2, seed=1,
                          packing=packing)
    one = DataPipeline(source, config, process_index=0, process_count=1, mixing=mixing)
    halves = [DataPipeline(source, config, process_index=p, process_count=2, mixing=mixing)
              for p in range(2)]
    assert one.num_steps == halves[0].num_steps > 0
    for whole, a, b in zip(one.iterator(), halves[0].iterator(), halves[1].iterator()):
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), whole[key])
    # resume mid-run from the state alone
    it = one.iterator()
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = list(it)
    resumed = list(one.iterator(state))
    _assert_same_batches(rest, resumed)


def test_mixed_plan_fingerprint_changes_with_weights():
    source = ConcatRows([_rows(30, 1000), _rows(200, 5000)])
    config = LoaderConfig(seq_len=16, global_batch_size=8)
    a = DataPipeline(source, config, process_index=0, process_count=1,
                     mixing=Mixing(source.sizes, (0.25, 0.75)))
    b = DataPipeline(source, config, process_index=0, process_count=1,
                     mixing=Mixing(source.sizes, (0.5, 0.5)))
    with pytest.raises(ValueError, match="fingerprint"):
        b.iterator(a.iterator().get_state())


def test_weighted_tfds_and_file_sources_train_batches(world, tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    _reference_rows(world, jsonl)
    config = _config(world, tmp_path, sources=f"tfds:derta_mixture/derta:train@1,{jsonl}@3",
                     mixture_epoch="first_exhausted")
    validate(config)
    batches, data = _batches(config, tmp_path)
    rows = NUM_HELPFUL + NUM_SAFETY  # each source holds the same 120 rows
    assert data.report["rows"] == 2 * rows
    assert any("weight 3" in note for note in data.report["notes"])
    # Grain's length for 1:3 over two sources of 120 rows: 160 an epoch, 40 + 120; two epochs
    plan = data.pipeline.plan
    from_tfds = int((plan.row_ids < rows).sum())
    assert (from_tfds, plan.row_ids.size - from_tfds) == (2 * 40, 2 * 120)
    # the batches hold exactly the planned tokens (the TFDS rows and the file's alike)
    assert sum(int(b["segment_ids"].astype(bool).sum()) for b in batches) == plan.num_tokens
