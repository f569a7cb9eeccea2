"""An in-memory stand-in for Google Cloud Storage, for gs:// workdir tests.

No GCS here, so the `gcs` fsspec protocol (the one etils.epath dispatches gs:// paths to)
is replaced by an in-memory filesystem: a gs:// path is then real URI handling end to
end, and any local write to `$PWD/gs:/...` (os.path.abspath / open on the URI) shows up
as a local directory under the test's tmp_path, the working directory while it runs.
Orbax writes and reads array data through tensorstore's own GCS driver, which fsspec
cannot stand in for: tests point Orbax at a local directory and check the path asked.
"""

from __future__ import annotations

import importlib

import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}
    pseudo_dirs = [""]

    def __init__(self, *args, finalize_on_close=False, **kwargs):
        del finalize_on_close  # gcsfs-only argument that etils passes
        super().__init__(*args, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
    """gs:// paths live in a fresh in-memory store (returned: {"gs://b/path": file}) for
    the test; the working directory is tmp_path."""
    registry = importlib.import_module("fsspec.registry")  # the module, not its dict view
    for name in ("gcs", "gs"):
        monkeypatch.setitem(registry._registry, name, FakeGCS)
    monkeypatch.setattr(FakeGCS, "store", {})
    monkeypatch.setattr(FakeGCS, "pseudo_dirs", [""])
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.chdir(tmp_path)  # a local "gs:" directory would appear here
    yield FakeGCS.store
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
