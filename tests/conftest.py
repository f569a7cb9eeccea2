"""Shared test set-up.

Eight fake CPU devices are visible to every test (set before jax is imported), so mesh
and sharding tests run on a laptop. Fixtures live in one file per area, listed below.

XLA compiles the tests' programs with LLVM optimisation level 0
(--xla_backend_optimization_level=0): most tests run small programs once or a few times, so
compiling is most of their cost. Measured on two groups of test files on 2 cores:
385 -> 322 CPU s (train_e2e, decode_sharded, train_step) and 249 -> 213 CPU s (the SmolLM2
files), the second group's runtime-heavy tests included. XLA's own HLO passes still run;
results stay within the tests' tolerances (subprocesses inherit the flags, so both sides of
a comparison compile alike).

One persistent XLA compilation cache serves the whole session (the pytest-xdist workers and
the subprocesses tests start inherit it): many tests train or decode the same small models,
and compiling is most of their time. It lives in a fresh temporary directory, so every
session starts cold, as CI does, unless JAX_COMPILATION_CACHE_DIR is already set (then that
cache is used, and kept).
"""

import os
import tempfile

from tests.xla_env import xla_flags  # noqa: E402  (no jax import)

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller's choice, workers inherit it
    _SESSION_CACHE = tempfile.mkdtemp(prefix="derta_jax_test_xla_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

pytest_plugins = [
    "tests.fixtures_tokenizers",
    "tests.fixtures_hf",
    "tests.fixtures_gcs",
    "tests.fixtures_install",
]


def pytest_unconfigure(config):
    """The process that made the session's cache removes it (an xdist worker made none)."""
    if _SESSION_CACHE is not None:
        import shutil

        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
        os.environ.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
