"""derta_jax installed as a user installs it (`pip install .`), apart from this checkout.

The package is built from the checkout and installed into its own directory (pip --target,
no dependencies: they are this interpreter's), console scripts included. Commands then run
from an empty directory with only that installation on PYTHONPATH, so nothing can come
from the checkout (configs/, tests/, the package sources)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.xla_env import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def installed(tmp_path_factory):
    """-> run(argv, cwd=None, timeout=900) -> CompletedProcess, for the installed package:
    argv[0] is a console script name (derta-reproduce) or "python"."""
    root = tmp_path_factory.mktemp("installed")
    target, source = root / "site", root / "source"
    # a copy of what a source distribution holds: setuptools builds in the source tree
    # (build/, *.egg-info), which must not land in the checkout
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copytree(REPO / "derta_jax", source / "derta_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-cache-dir", f"--target={target}", str(source)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "TMPDIR": str(root), "PIP_NO_INPUT": "1"}, cwd=str(root))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (target / "derta_jax" / "weights.py").is_file()
    assert not (target / "configs").exists() and not (target / "tests").exists()
    empty = root / "empty"
    empty.mkdir()

    def run(argv, cwd=None, timeout=900):
        exe = sys.executable if argv[0] == "python" else str(target / "bin" / argv[0])
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(PYTHONPATH=str(target), JAX_PLATFORMS="cpu",
                   XLA_FLAGS=xla_flags(1))
        return subprocess.run([exe, *argv[1:]], cwd=str(cwd or empty), env=env,
                              capture_output=True, text=True, timeout=timeout)

    return run
