"""Paths that may be local or remote, and the one rule for writing an output directory.

Why one module: every command reads and writes directories that may be local paths or URIs
(`gs://bucket/run` on a TPU pod, also s3://, az://), and every command that writes a
directory must refuse to overwrite a user's files unless asked. Both rules are written
here once; workdir.py, hf/, eval/ and the commands use them.

Every path goes through etils.epath (`resolve`), never os.path.abspath or open(), which
would turn `gs://b/r` into the local directory `$PWD/gs:/b/r`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterable, Iterator, Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_remote(path: PathLike) -> bool:
    """A URI (gs://, s3://, ...) rather than a local path."""
    return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
    """`path` as an epath.Path: local paths made absolute (every process and a resumed run
    agree on them), URIs kept as they are."""
    text = os.fspath(path)
    if not is_remote(text):
        return epath.Path(os.path.abspath(text))
    try:
        return epath.Path(text)
    except KeyError:
        raise ValueError(f"{text!r}: unsupported URI scheme; use a local path or "
                         f"gs://, s3://, az://") from None


def check_output_dir(directory: PathLike, overwrite: bool) -> None:
    """THE output rule of every command, checked without creating anything: an existing
    non-directory is refused, so is a non-empty directory unless `overwrite`
    (`--overwrite`). Commands check it before their slow part, so a refusal loses nothing."""
    path = resolve(directory)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass --overwrite to write "
                              f"into it")


def check_output_file(path: PathLike, overwrite: bool) -> None:
    """The same rule for a command whose output is one file: a directory is refused, and so
    is an existing file unless `overwrite` (`--overwrite`)."""
    target = resolve(path)
    if target.is_dir():
        raise FileExistsError(f"{target} is a directory; the output is a file")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")


def prepare_output_dir(directory: PathLike, overwrite: bool,
                       replaces: Iterable[str] = ()) -> epath.Path:
    """`check_output_dir`, then the directory created; when it is overwritten, the names in
    `replaces` (this command's own earlier outputs, files or directories) are removed first
    so that no stale output survives next to the new one. Nothing else is ever deleted."""
    check_output_dir(directory, overwrite)
    path = resolve(directory)
    path.mkdir(parents=True, exist_ok=True)
    for name in replaces:
        old = path / name
        if old.is_dir():
            old.rmtree() if is_remote(path) else shutil.rmtree(os.fspath(old))
        elif old.exists():
            old.unlink()
    return path


@contextlib.contextmanager
def staged(directory: PathLike) -> Iterator[str]:
    """A local directory for code that only writes local files (tokenizers' save_pretrained,
    shutil): `directory` itself when local; else a temporary one whose files are copied
    into `directory` on exit."""
    target = resolve(directory)
    if not is_remote(target):
        target.mkdir(parents=True, exist_ok=True)
        yield os.fspath(target)
        return
    with tempfile.TemporaryDirectory(prefix="derta_jax_stage_") as local:
        yield local
        copy_tree(local, target)


@contextlib.contextmanager
def fetched(directory: PathLike) -> Iterator[str]:
    """A local directory holding the files of `directory`, for code that only reads local
    files (AutoTokenizer.from_pretrained, shutil): `directory` itself when local; else a
    temporary copy, deleted on exit. Raises FileNotFoundError naming a missing remote one."""
    if not is_remote(directory):
        yield os.fspath(directory)
        return
    source = resolve(directory)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such directory")
    with tempfile.TemporaryDirectory(prefix="derta_jax_fetch_") as local:
        copy_tree(source, local)
        yield local


def copy_tree(src: PathLike, dst: PathLike) -> list[str]:
    """Copies the files under `src` into `dst` (either side local or remote), overwriting;
    returns the relative paths copied.

    Walks with iterdir, not epath's walk: for gs:// that yields its directories without
    the scheme ('bucket/run/x'), which would then be read as local paths."""
    src, dst = epath.Path(src), epath.Path(dst)
    copied = []
    for rel in _relative_files(src):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).copy(dst / rel, overwrite=True)
        copied.append(rel)
    return copied


def _relative_files(directory: epath.Path, prefix: str = "") -> Iterator[str]:
    for child in sorted(directory.iterdir(), key=lambda p: p.name):
        rel = os.path.join(prefix, child.name)
        if child.is_dir():
            yield from _relative_files(child, rel)
        else:
            yield rel
