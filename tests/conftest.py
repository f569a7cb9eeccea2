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


# The files that take longest, longest first (wall seconds in the full suite on 2 cores,
# 2026-12-03): handed to the pytest-xdist workers before the others, so that no worker
# starts one of them while the other is nearly done. --dist loadfile otherwise orders the
# files by how many tests they hold, which put these few-test, slow files last (a 14:30
# suite had 1,576 CPU s of work: 13:08 on 2 cores if evenly shared).
SLOW_FILES_FIRST = (
    "test_train_e2e.py",           # ~300 s: several multi-process and resumed runs
    "test_reproduce.py",           # ~150 s: the smoke reproduction, twice
    "test_train_from_hf.py",       # ~145 s: two processes reading a bucket
    "test_reproduce_smollm2.py",   # ~100 s
    "test_reproduce_attacks.py",   # ~70 s: the smoke with every attack, base and one recipe
    "test_models_parity.py",       # ~90 s: SmolLM2 against transformers
    "test_lora_smollm2.py",        # ~75 s
    "test_plan.py",                # ~70 s
    "test_evaluate.py",            # ~65 s
    "test_decode_sharded.py",      # ~60 s
    "test_constrained_loss.py",    # ~55 s: four short training runs
    "test_durability.py",          # ~30 s: a LoRA attack and three evaluations
)


def pytest_configure(config):
    """Keep the collection order below for xdist's loadfile scheduling (it would reorder the
    files by their number of tests)."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """SLOW_FILES_FIRST first, in that order; every other file after them, as collected."""
    rank = {name: index for index, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
