"""Shared test set-up.

Eight fake CPU devices are visible to every test (set before jax is imported), so mesh
and sharding tests run on a laptop. Fixtures live in one file per area, listed below.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures_tokenizers",
    "tests.fixtures_hf",
    "tests.fixtures_gcs",
    "tests.fixtures_install",
]
