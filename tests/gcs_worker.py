"""`python -m derta_jax.train` in a subprocess whose gs:// bucket is a local directory.

For multi-process tests: every process of a 2-process trainer must see the same bucket,
which tests/fixtures_gcs.py's in-memory store cannot give across processes. Here epath's
gs:// (fsspec) maps to $DERTA_TEST_BUCKET_ROOT/<bucket>/..., and tensorstore's GCS driver
(Orbax's arrays) talks to $TENSORSTORE_GCS_HTTP_URL, a tests/fixtures_gcs.py
directory_bucket_server over the same directory (one server per process, so each process's
reads are counted apart).

    python -m tests.gcs_worker --config=RECIPE --config.a.b=v ...
"""

from __future__ import annotations

import os
import runpy
import sys
import types

from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


class DirectoryGCS(DirFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, *args, finalize_on_close=False, **kwargs):
        del args, finalize_on_close, kwargs
        super().__init__(path=os.environ["DERTA_TEST_BUCKET_ROOT"],
                         fs=LocalFileSystem(auto_mkdir=True))

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for scheme in ("gs://", "gcs://"):
            if path.startswith(scheme):
                path = path[len(scheme):]
        return path.rstrip("/")


def install() -> None:
    import fsspec
    from orbax.checkpoint._src.path import gcs_utils

    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, DirectoryGCS, clobber=True)
    gcs_utils.get_bucket = lambda name: types.SimpleNamespace(
        name=name, hierarchical_namespace_enabled=False)


if __name__ == "__main__":
    install()
    sys.argv = ["derta_jax.train", *sys.argv[1:]]
    runpy.run_module("derta_jax.train", run_name="__main__", alter_sys=True)
