"""End-to-end trainer tests: real `python -m derta_jax.train` subprocesses on a micro config.

What they pin down: the same losses on 1 and 8 devices and on 2 processes x 4 devices;
a run killed with SIGKILL (or stopped with SIGTERM) and restarted with the same command
ends with parameters bit-identical to an uninterrupted run; SIGTERM to one of two
processes stops both at the same step; a checkpoint saved on 8 devices resumes on 1; a
non-finite loss stops the run and keeps the last good checkpoint; a run from a TFDS data
set built from the synthetic world's files (data.sources=tfds:derta_mixture/derta:train),
killed and resumed, ends bit-identical to the synthetic run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_tfds import world  # noqa: F401  (a fixture)
from tests.xla_env import xla_flags

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
MICRO = [
    "--config=configs/tiny.py",
    "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
    "--config.model.num_layers=1", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
    "--config.model.head_dim=16",
    "--config.data.synthetic_triples=40", "--config.data.synthetic_helpful=80",
    "--config.data.num_safety=40", "--config.data.max_length=128",
    "--config.train.batch_size=8", "--config.train.num_epochs=4",
    f"--config.train.max_steps={STEPS}", "--config.train.log_every=1",
    "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=10",
    "--config.loss.rto_keep_rate=0.5",  # exercise the per-step random keep mask on resume
]


_COMPILE_CACHE: list[str] = []  # one persistent XLA cache for this module's subprocesses


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    """Every run compiles the same programs: cache them (about a third of each run's time)."""
    _COMPILE_CACHE[:] = [str(tmp_path_factory.mktemp("xla_cache"))]
    yield
    _COMPILE_CACHE.clear()


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    if _COMPILE_CACHE:
        env["JAX_COMPILATION_CACHE_DIR"] = _COMPILE_CACHE[0]
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    env["PYTHONPATH"] = str(REPO)
    env.pop("JAX_PLATFORMS", None)
    return env


def _cmd(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "derta_jax.train", *MICRO, f"--config.workdir={workdir}", *extra]


def train(workdir: Path, *extra: str, devices: int = 8, timeout: int = 600):
    result = subprocess.run(_cmd(workdir, *extra), cwd=REPO, env=_env(devices),
                            capture_output=True, text=True, timeout=timeout)
    return result


def start(workdir: Path, *extra: str, devices: int = 8) -> subprocess.Popen:
    return subprocess.Popen(_cmd(workdir, *extra), cwd=REPO, env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(workdir: Path) -> dict[int, float]:
    """Loss per step; after a resume the re-done steps' LAST record wins."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[int(row["step"])] = row["loss"]
    return out


def final_params(workdir: Path) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    path = workdir / "checkpoints" / str(STEPS) / "params"
    tree = ocp.PyTreeCheckpointer().restore(str(path))
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        else:
            flat[prefix] = np.asarray(node)

    walk("", tree)
    return flat


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.05)


def logged_steps(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("baseline")
    assert_ok(train(workdir))
    return workdir


def test_uninterrupted_run_writes_everything(baseline):
    for name in ("config.json", "model_config.json", "metrics.jsonl", "summary.json",
                 "loss_curve.png", "data_report.json", "tokenizer/tokenizer.json"):
        assert (baseline / name).exists(), name
    assert sorted(losses(baseline)) == list(range(1, STEPS + 1))
    steps = sorted(int(p.name) for p in (baseline / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4, 6]
    assert list((baseline / "tensorboard").iterdir()), "no TensorBoard event file"
    tail = json.loads((baseline / "summary.json").read_text())["tail_mean_metrics"]
    logged = losses(baseline)  # 6 logs: the last 10% of steps is 1 log, so the last 5
    assert (tail["first_step"], tail["last_step"], tail["logs"]) == (2, STEPS, 5)
    assert tail["metrics"]["loss"] == pytest.approx(np.mean([logged[s] for s in range(2, 7)]))


def test_one_device_matches_eight(baseline, tmp_path):
    assert_ok(train(tmp_path, devices=1))
    one, eight = losses(tmp_path), losses(baseline)
    for step in range(1, 6):
        assert one[step] == pytest.approx(eight[step], rel=1e-5), step


def test_sigkill_at_several_points_resumes_bit_identical(baseline, tmp_path):
    # 1) killed right after the step-2 checkpoint became visible (possibly mid async save of
    #    nothing newer); 2) killed in the middle of step 5's work; 3) run to the end.
    proc = start(tmp_path)
    wait_for(lambda: (tmp_path / "checkpoints" / "2").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = start(tmp_path)
    wait_for(lambda: logged_steps(tmp_path) >= 4 + 2, proc)  # resumed and logged a few steps
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_ok(train(tmp_path))
    ref, got = final_params(baseline), final_params(tmp_path)
    assert ref.keys() == got.keys()
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    assert losses(tmp_path) == losses(baseline)


def test_tfds_source_killed_and_resumed_matches_the_synthetic_run(baseline, world, tmp_path):
    # the world's triples/helpful files are the rows the synthetic run mixes in memory, the
    # fixture's tokenizer the one it trains: the TFDS run must give the same batches, so the
    # same losses and parameters, also across a SIGKILL (tests/test_data_sources.py checks
    # the batches against the same files named as data.triples/helpful)
    flags = ["--config.data.synthetic=False", f"--config.data.tokenizer={world['tokenizer']}",
             "--config.data.sources=tfds:derta_mixture/derta:train",
             f"--config.data.tfds_data_dir={world['data_dir']}"]
    proc = start(tmp_path, *flags)
    wait_for(lambda: (tmp_path / "checkpoints" / "2").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_ok(train(tmp_path, *flags))
    assert losses(tmp_path) == losses(baseline)
    ref, got = final_params(baseline), final_params(tmp_path)
    assert ref.keys() == got.keys()
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


def test_sigterm_saves_then_resume_is_bit_identical(baseline, tmp_path):
    proc = start(tmp_path)
    wait_for(lambda: logged_steps(tmp_path) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "interrupted, checkpoint saved" in out
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 3 and saved[-1] < STEPS  # the stop step itself was saved
    assert_ok(train(tmp_path))
    ref, got = final_params(baseline), final_params(tmp_path)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


def test_checkpoint_from_eight_devices_resumes_on_one(baseline, tmp_path):
    import shutil

    shutil.copytree(baseline, tmp_path / "w")
    workdir = tmp_path / "w"
    for step in (4, 6):  # keep only the step-2 checkpoint, as if stopped there
        shutil.rmtree(workdir / "checkpoints" / str(step))
    assert_ok(train(workdir, devices=1))
    ref, got = final_params(baseline), final_params(workdir)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=2e-5, atol=2e-6, err_msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(baseline, tmp_path):
    port = _free_port()
    common = ["--config.distributed.initialize=always",
              f"--config.distributed.coordinator_address=127.0.0.1:{port}",
              "--config.distributed.num_processes=2"]
    procs = [start(tmp_path, *common, f"--config.distributed.process_id={i}", devices=4)
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    two, one = losses(tmp_path), losses(baseline)
    for step in range(1, STEPS + 1):
        assert two[step] == pytest.approx(one[step], rel=1e-5), step


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    # Only process 1 is signalled; a save it made alone would hang on the collective.
    # A long run (the last --config flag wins) so that the signal lands mid-run.
    port = _free_port()
    common = ["--config.distributed.initialize=always",
              f"--config.distributed.coordinator_address=127.0.0.1:{port}",
              "--config.distributed.num_processes=2", "--config.train.max_steps=28",
              "--config.checkpoint.every_steps=100"]
    procs = [start(tmp_path, *common, f"--config.distributed.process_id={i}", devices=4)
             for i in range(2)]
    try:
        wait_for(lambda: logged_steps(tmp_path) >= 2, procs[0])
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:  # a hang (processes disagreeing about the stop) must not leak processes
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "stop requested by another process: checkpoint saved at step" in outputs[0]
    assert "SIGTERM received: checkpoint saved at step" in outputs[1]
    stops = {int(out.split("checkpoint saved at step ")[1].split(";")[0]) for out in outputs}
    assert len(stops) == 1, stops
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == list(stops) and saved[0] < 28
    assert "interrupted, checkpoint saved" in outputs[0]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # A learning rate this large blows the weights up within a few steps.
    result = train(tmp_path, "--config.optim.lr=1e12", "--config.optim.grad_clip=0",
                   "--config.optim.warmup_ratio=0", "--config.checkpoint.every_steps=1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: non-finite loss at or before step" in result.stderr
    logged = losses(tmp_path)
    bad = min(s for s, v in logged.items() if not np.isfinite(v))
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == list(range(1, bad)), (saved, bad)


def test_config_error_names_the_field(tmp_path):
    result = train(tmp_path, "--config.optim.lr=-1.0")
    assert result.returncode == 2
    assert "error: optim.lr=-1.0: must be > 0" in result.stderr
