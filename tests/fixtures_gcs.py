"""An in-memory stand-in for Google Cloud Storage, for gs:// workdir tests.

No GCS here, so the `gcs` fsspec protocol (the one etils.epath dispatches gs:// paths to)
is replaced by an in-memory filesystem: a gs:// path is then real URI handling end to
end, and any local write to `$PWD/gs:/...` (os.path.abspath / open on the URI) shows up
as a local directory under the test's tmp_path, the working directory while it runs.
Orbax writes and reads array data through tensorstore's own GCS driver, which fsspec
cannot stand in for: tests point Orbax at a local directory and check the path asked.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib
import json
import os
import threading
import types
import urllib.parse

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

    @classmethod
    def _strip_protocol(cls, path):
        """'gs://bucket/x' -> 'bucket/x', as gcsfs does: etils puts the scheme back on
        the names that glob and listings return."""
        path = os.fspath(path)
        for scheme in ("gs://", "gcs://"):
            if path.startswith(scheme):
                path = path[len(scheme):]
        return path.rstrip("/")


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
    """gs:// paths live in a fresh in-memory store (returned: {"bucket/path": file}) for
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


# ----------------------------------------------------------------------------- tensorstore

class _JsonApi(http.server.BaseHTTPRequestHandler):
    """The part of GCS's JSON API that tensorstore's `gcs` kvstore driver calls, over
    FakeGCS.store: objects are read (whole or a byte range), listed, uploaded and deleted,
    with generations, so Orbax's checkpoint arrays land in the same store as epath's files."""

    protocol_version = "HTTP/1.1"
    served: list = []  # (method, "bucket/object" or "bucket/" for a listing), per test
    served_bytes: list = []  # ("bucket/object", bytes of object data sent), per test
    served_ranges: list = []  # ("bucket/object", first byte, end byte (exclusive)), per test

    def log_message(self, *args):  # no line per request on stderr
        pass

    def _reply(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, content: dict) -> None:
        self._reply(code, json.dumps(content).encode(), {"Content-Type": "application/json"})

    def _target(self):
        """(bucket, object name or None, query) of the request."""
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        parts = url.path.split("/")
        # /storage/v1/b/BUCKET[/o[/OBJECT]] or /upload/storage/v1/b/BUCKET/o
        start = parts.index("b")
        bucket = parts[start + 1]
        name = "/".join(parts[start + 3:]) if len(parts) > start + 3 else None
        name = urllib.parse.unquote(name) if name else None
        self.served.append((self.command, f"{bucket}/{name or query.get('name', '')}"))
        return bucket, name, query

    # -- the store: FakeGCS's in-memory files ({"bucket/name": MemoryFile}) -----------------
    def _get(self, key: str):
        return FakeGCS.store.get(key)

    def _keys(self) -> list:
        return sorted(FakeGCS.store)

    def _put(self, key: str, body: bytes) -> None:
        FakeGCS().pipe_file(key, body)

    def _delete(self, key: str) -> None:
        del FakeGCS.store[key]

    @staticmethod
    def _bytes(file) -> bytes:
        return file.getvalue()

    @staticmethod
    def _generation(file) -> int:
        """A rewritten object is a new MemoryFile, so its creation time is a generation."""
        return int(file.created.timestamp() * 1e6)

    def _metadata(self, bucket: str, name: str, file) -> dict:
        return {"kind": "storage#object", "bucket": bucket, "name": name,
                "size": str(len(self._bytes(file))), "generation": str(self._generation(file))}

    def _precondition_fails(self, query: dict, file) -> bool:
        generation = 0 if file is None else self._generation(file)
        match = query.get("ifGenerationMatch")
        return match is not None and int(match) != generation

    def do_GET(self):
        bucket, name, query = self._target()
        if urllib.parse.urlsplit(self.path).path.rstrip("/").endswith(f"/b/{bucket}"):
            return self._json(200, {"kind": "storage#bucket", "name": bucket})
        if name is None:  # list the bucket's objects
            prefix = query.get("prefix", "")
            start, end = query.get("startOffset", ""), query.get("endOffset")
            items = []
            for key in self._keys():
                if not key.startswith(f"{bucket}/"):
                    continue
                obj = key[len(f"{bucket}/"):]
                if obj.startswith(prefix) and obj >= start and (end is None or obj < end):
                    items.append(self._metadata(bucket, obj, self._get(key)))
            return self._json(200, {"kind": "storage#objects", "items": items})
        file = self._get(f"{bucket}/{name}")
        if file is None:
            return self._json(404, {"error": {"code": 404, "message": f"{name}: no such object"}})
        if self._precondition_fails(query, file):
            return self._json(412, {"error": {"code": 412, "message": "precondition failed"}})
        generation = str(self._generation(file))
        if query.get("ifGenerationNotMatch") == generation:
            return self._reply(304, headers={"x-goog-generation": generation})
        if query.get("alt") != "media":
            return self._json(200, self._metadata(bucket, name, file))
        data, code, headers = self._bytes(file), 200, {"x-goog-generation": generation}
        first = 0
        requested = self.headers.get("Range")  # bytes=A-B, bytes=A- or bytes=-N
        if requested:
            first, last = requested.split("=", 1)[1].split("-")
            if not first:
                first, last = len(data) - int(last), ""
            first, last = int(first), int(last) if last else len(data) - 1
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            data, code = data[first:last + 1], 206
        self.served_bytes.append((f"{bucket}/{name}", len(data)))
        self.served_ranges.append((f"{bucket}/{name}", first, first + len(data)))
        return self._reply(code, data, headers)

    def do_POST(self):
        bucket, _, query = self._target()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        key = f"{bucket}/{query['name']}"
        with _LOCK:
            if self._precondition_fails(query, self._get(key)):
                return self._json(412, {"error": {"code": 412, "message": "precondition failed"}})
            self._put(key, body)
            return self._json(200, self._metadata(bucket, query["name"], self._get(key)))

    def do_DELETE(self):
        bucket, name, query = self._target()
        key = f"{bucket}/{name}"
        with _LOCK:
            file = self._get(key)
            if file is None:
                return self._json(404, {"error": {"code": 404, "message": f"{name}: no such object"}})
            if self._precondition_fails(query, file):
                return self._json(412, {"error": {"code": 412, "message": "precondition failed"}})
            self._delete(key)
            return self._reply(204)


_LOCK = threading.Lock()


@pytest.fixture(scope="session")
def _json_api_server():
    """One server for the session: tensorstore reads its endpoint once per process."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JsonApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def fake_gcs_tensorstore(fake_gcs, _json_api_server, monkeypatch):
    """`fake_gcs`, also served to tensorstore's GCS driver (so Orbax reads and writes
    gs:// checkpoints in the same store); returns the requests tensorstore made, as
    (method, "bucket/object") pairs.

    Orbax also asks google-cloud-storage (not installed here; gcsfs brings it on real
    machines) whether a bucket has a hierarchical namespace: this fake's is flat."""
    from orbax.checkpoint._src.path import gcs_utils

    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", _json_api_server)
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake-token")
    monkeypatch.setattr(gcs_utils, "get_bucket",
                        lambda name: types.SimpleNamespace(name=name,
                                                           hierarchical_namespace_enabled=False))
    monkeypatch.setattr(_JsonApi, "served", [])
    monkeypatch.setattr(_JsonApi, "served_bytes", [])
    monkeypatch.setattr(_JsonApi, "served_ranges", [])
    yield _JsonApi.served


# ----------------------------------------------------------------------------- a bucket on disk

class DirectoryJsonApi(_JsonApi):
    """The same API over a local directory (ROOT/bucket/name files), so that several
    processes (a multi-process trainer's subprocesses, each with its own server and so its
    own request log) see one bucket. Subclassed per server with `root` set."""

    root: str = ""

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def _get(self, key: str):
        path = self._path(key)
        return path if os.path.isfile(path) else None

    def _keys(self) -> list:
        keys = []
        for directory, _, files in os.walk(self.root):
            keys += [os.path.relpath(os.path.join(directory, f), self.root) for f in files]
        return sorted(keys)

    def _put(self, key: str, body: bytes) -> None:
        os.makedirs(os.path.dirname(self._path(key)), exist_ok=True)
        temp = self._path(key) + ".uploading"
        with open(temp, "wb") as f:
            f.write(body)
        os.replace(temp, self._path(key))

    def _delete(self, key: str) -> None:
        os.remove(self._path(key))

    @staticmethod
    def _bytes(path) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    @staticmethod
    def _generation(path) -> int:
        return os.stat(path).st_mtime_ns


@contextlib.contextmanager
def directory_bucket_server(root: str):
    """A JSON-API server over `root` -> (its URL, its handler class: .served,
    .served_bytes, .served_ranges)."""
    handler = type("DirectoryJsonApiAt", (DirectoryJsonApi,),
                   {"root": str(root), "served": [], "served_bytes": [], "served_ranges": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", handler
    finally:
        server.shutdown()
