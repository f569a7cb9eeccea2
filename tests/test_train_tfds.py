"""Training from a TFDS data set: `python -m derta_jax.train` subprocesses on the micro config.

A run from `data.sources=tfds:derta_mixture/derta:train` (built from the world's files by
the command) has the losses of the run from the same files named as data.triples/helpful,
step for step, bit for bit; and a TFDS run killed with SIGKILL after its step-2 checkpoint
and restarted with the same command ends with the same parameters.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest

from tests.fixtures_tfds import world  # noqa: F401  (a fixture)
from tests.test_train_e2e import (STEPS, _compile_cache, assert_ok, final_params,  # noqa: F401
                                  losses, start, train, wait_for)


def _data_flags(world, **fields):
    flags = ["--config.data.synthetic=False", f"--config.data.tokenizer={world['tokenizer']}"]
    return flags + [f"--config.data.{k}={v}" for k, v in fields.items()]


@pytest.fixture(scope="module")
def from_files(world, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("from_files")
    assert_ok(train(workdir, *_data_flags(world, triples=world["triples"],
                                          helpful=world["helpful"])))
    return workdir


def test_tfds_run_killed_and_resumed_matches_the_jsonl_run(world, from_files, tmp_path):
    flags = _data_flags(world, sources="tfds:derta_mixture/derta:train",
                        tfds_data_dir=world["data_dir"])
    proc = start(tmp_path, *flags)
    wait_for(lambda: (tmp_path / "checkpoints" / "2").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_ok(train(tmp_path, *flags))
    assert losses(tmp_path) == losses(from_files)
    assert sorted(losses(tmp_path)) == list(range(1, STEPS + 1))
    ref, got = final_params(from_files), final_params(tmp_path)
    assert ref.keys() == got.keys()
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


def test_a_missing_tfds_source_exits_2_before_compiling(world, tmp_path):
    result = train(tmp_path, *_data_flags(world, sources="tfds:nope:train",
                                          tfds_data_dir=world["data_dir"]), devices=1)
    assert result.returncode == 2, result.stderr[-2000:]
    err = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "tfds:nope:train" in err[0] and "derta_mixture/derta:1.0.0" in err[0]
    assert not (tmp_path / "checkpoints").exists()
