"""The TFDS side of derta_jax data: the record schema, and opening a prepared split.

Every TFDS data set derta_jax writes (`python -m derta_jax.data.tfds_build`) stores one
`TextRow` per record, before any template, so the same data set trains any model and
template; the training run tokenises it once into the token cache. Records are ArrayRecord
files, read with random access by `tfds.data_source` (no TensorFlow anywhere).

A data set written by another tool can be used when its records have the same features;
the error names the fields it lacks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Iterator, Mapping

from derta_jax.data.templates import TextRow

TEXT_FIELDS = ("question", "response", "prefill", "prompt", "kind", "source")
BOOL_FIELDS = ("rto",)
READ_CHUNK = 1024  # records fetched per call while streaming a split


class TfdsSourceError(ValueError):
    """A TFDS source that cannot be read (the message names it and says what exists)."""


def features():
    """The FeaturesDict of a derta_jax record (imports tensorflow_datasets, not TensorFlow)."""
    import numpy as np
    import tensorflow_datasets as tfds

    spec = {name: tfds.features.Text() for name in TEXT_FIELDS}
    spec.update({name: np.bool_ for name in BOOL_FIELDS})
    return tfds.features.FeaturesDict(spec)


def record_of(row: TextRow) -> dict:
    return dataclasses.asdict(row)


def row_of(record: Mapping[str, Any], where: str) -> TextRow:
    """A decoded record (Text features come back as bytes) as a TextRow."""
    missing = [name for name in TEXT_FIELDS + BOOL_FIELDS if name not in record]
    if missing:
        raise TfdsSourceError(f"{where}: the records lack the field(s) {', '.join(missing)} "
                              f"(a derta_jax record has {', '.join(TEXT_FIELDS + BOOL_FIELDS)}; "
                              f"build one with python -m derta_jax.data.tfds_build)")
    values = {name: _text(record[name]) for name in TEXT_FIELDS}
    return TextRow(rto=bool(record["rto"]), **values)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def default_data_dir() -> str:
    """TFDS's own default ($TFDS_DATA_DIR, else ~/tensorflow_datasets)."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"),
                                                           "tensorflow_datasets")


def prepared_datasets(data_dir: str) -> list[str]:
    """`name[/config]:version` of every data set prepared under `data_dir` (for errors)."""
    from etils import epath

    root, found = epath.Path(data_dir), []
    if not root.is_dir():
        return found
    for info in sorted(root.glob("*/*/dataset_info.json")) + sorted(
            root.glob("*/*/*/dataset_info.json")):
        parts = info.parent.relative_to(root).parts
        found.append("/".join(parts[:-1]) + ":" + parts[-1])
    return found


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
    """One opened split: random access (`source[i]`, `source.__getitems__`) and identity."""
    name: str  # as given, name[/config][:version]
    split: str
    source: Any  # tfds' ArrayRecordDataSource
    fingerprint: str  # changes when the prepared data set does

    def __len__(self) -> int:
        return len(self.source)

    def rows(self) -> Iterator[TextRow]:
        """Every record in order, as TextRows, a chunk of READ_CHUNK at a time."""
        where = f"tfds:{self.name}:{self.split}"
        for start in range(0, len(self.source), READ_CHUNK):
            keys = list(range(start, min(start + READ_CHUNK, len(self.source))))
            for record in self.source.__getitems__(keys):
                yield row_of(record, where)


def open_split(name: str, split: str, data_dir: str) -> TfdsSplit:
    """`tfds.data_source(name, split)` from `data_dir`, or a TfdsSourceError that lists
    what `data_dir` holds (a missing data set) or the splits there are (a missing split)."""
    import tensorflow_datasets as tfds

    where = f"tfds:{name}:{split}"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError, DatasetVariantBlockedError, bad names
        existing = prepared_datasets(data_dir)
        raise TfdsSourceError(
            f"{where}: no such data set in data.tfds_data_dir={data_dir!r} "
            f"({_first_line(e)}); prepared there: {', '.join(existing) or 'none'}") from None
    if not builder.is_prepared():
        raise TfdsSourceError(f"{where}: not prepared in {data_dir!r}; prepared there: "
                              f"{', '.join(prepared_datasets(data_dir)) or 'none'}")
    splits = sorted(builder.info.splits.keys())
    base = split.split("[")[0]
    if base not in splits:
        raise TfdsSourceError(f"{where}: no split {base!r}; the data set has "
                              f"{', '.join(splits) or 'none'}")
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir,
                                  builder_kwargs=None, download=False)
    except Exception as e:  # a split slice TFDS cannot parse, a file format without random access
        raise TfdsSourceError(f"{where}: cannot be opened for random access "
                              f"({_first_line(e)})") from None
    missing = [n for n in TEXT_FIELDS + BOOL_FIELDS if n not in builder.info.features.keys()]
    if missing:
        raise TfdsSourceError(f"{where}: the records lack the field(s) {', '.join(missing)}; "
                              f"build the data set with python -m derta_jax.data.tfds_build")
    digest = hashlib.sha256(f"{name}|{split}|{builder.info.full_name}".encode("utf-8"))
    for file_name in ("dataset_info.json", "metadata.json", "features.json"):
        path = builder.data_path / file_name
        if path.exists():
            digest.update(path.read_bytes())
    return TfdsSplit(name, split, source, digest.hexdigest())


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
