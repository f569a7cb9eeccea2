"""Named data sources (`data.sources`): TFDS data sets and row files, with mixing weights.

    --config.data.sources='tfds:derta_mixture/derta:train@0.3, tfds:my_sft:train@0.7'
    --config.data.sources='gs://bucket/rows.jsonl, helpful:alpaca.parquet'

An entry is `[KIND:]LOCATION[@WEIGHT]`:

    tfds:NAME[/CONFIG][:VERSION][:SPLIT]   a prepared TFDS data set in data.tfds_data_dir
                                           (split default `train`; TFDS slices such as
                                           `train[:90%]` work)
    [reference:]PATH                       reference-format rows (prefix, text, safe)
    helpful:PATH                           helpful rows (instruction, output)

PATH is JSONL or Parquet (by suffix), local or remote (gs://, through epath). WEIGHT is a
positive number; give every entry one or none. Without weights the sources' rows are
concatenated and each is read once per epoch (as data.train_files are). With weights, Grain's
proportional mixing interleaves the sources (pipeline.py, `Mixing`).

Each source is read as a stream of TextRows (never a whole file in memory) and tokenised
once into its own token cache, keyed by the source's fingerprint (a TFDS data set's
dataset_info/metadata, a file's sha256) + tokenizer + template + max length.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Iterator

from derta_jax.data import formats, tfds_format
from derta_jax.data.templates import TextRow, reference_text_row

KINDS = ("tfds", "reference", "helpful")
DEFAULT_SPLIT = "train"
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


class SourceError(ValueError):
    """An entry of data.sources that cannot be used; the message names it and the field."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    text: str  # the entry as written, for messages
    kind: str  # one of KINDS
    location: str  # TFDS name[/config][:version], or a file path / URI
    split: str = ""  # TFDS only
    weight: float | None = None

    @property
    def label(self) -> str:
        return f"tfds:{self.location}:{self.split}" if self.kind == "tfds" else self.location


def parse_sources(text: str, field: str = "data.sources") -> list[SourceSpec]:
    """The entries of a data.sources string; SourceError naming the entry for a bad one."""
    entries = [e.strip() for e in text.split(",") if e.strip()]
    specs = [parse_entry(entry, f"{field} entry {number} {entry!r}")
             for number, entry in enumerate(entries, start=1)]
    weighted = [s.weight is not None for s in specs]
    if any(weighted) and not all(weighted):
        missing = ", ".join(repr(s.text) for s in specs if s.weight is None)
        raise SourceError(f"{field}: give every source a weight (@W) or none; "
                          f"without one: {missing}")
    return specs


def parse_entry(entry: str, where: str) -> SourceSpec:
    body, weight = entry, None
    if "@" in entry:
        body, _, raw = entry.rpartition("@")
        try:
            weight = float(raw)
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise SourceError(f"{where}: weight {raw!r} is not a positive number")
    kind, location = "reference", body.strip()
    head, sep, rest = location.partition(":")
    if sep and head in KINDS:
        kind, location = head, rest.strip()
    if not location:
        raise SourceError(f"{where}: no {'data set name' if kind == 'tfds' else 'path'}")
    if kind != "tfds":
        return SourceSpec(entry, kind, location, weight=weight)
    location, bracket, split_slice = location.partition("[")  # a TFDS slice: train[:10%]
    parts = location.split(":")
    split = DEFAULT_SPLIT
    if len(parts) == 2 and not _VERSION.match(parts[1]):
        location, split = parts
    elif len(parts) == 3:
        location, split = ":".join(parts[:2]), parts[2]
    elif len(parts) > 3:
        raise SourceError(f"{where}: expected tfds:NAME[/CONFIG][:VERSION][:SPLIT]")
    if not split or not location.split(":")[0]:
        raise SourceError(f"{where}: expected tfds:NAME[/CONFIG][:VERSION][:SPLIT]")
    return SourceSpec(entry, "tfds", location, split=split + bracket + split_slice,
                      weight=weight)


@dataclasses.dataclass
class OpenedSource:
    spec: SourceSpec
    fingerprint: str  # changes whenever the rows could
    rows: Callable[[], Iterator[TextRow]]  # a fresh stream of every row, in order
    skipped: list  # SkippedRow of bad rows (on_error="skip"), filled while `rows` runs


def open_source(spec: SourceSpec, tfds_data_dir: str, on_error: str = "raise") -> OpenedSource:
    """The source's row stream and fingerprint; SourceError when it cannot be read (a TFDS
    name or split that does not exist, a missing file, a remote path whose filesystem
    package or credentials are missing)."""
    skipped: list = []
    if spec.kind == "tfds":
        try:
            split = tfds_format.open_split(spec.location, spec.split, tfds_data_dir)
        except tfds_format.TfdsSourceError as e:
            raise SourceError(f"data.sources entry {spec.text!r}: {e}") from None
        return OpenedSource(spec, f"tfds-{split.fingerprint}", split.rows, skipped)
    problem = formats.input_file_problem(spec.location, spec.location)
    if problem:
        raise SourceError(f"data.sources entry {spec.text!r}: {problem}")
    try:
        digest = formats.file_sha256(spec.location)
    except (OSError, ValueError, ImportError) as e:
        raise SourceError(f"data.sources entry {spec.text!r}: cannot be read "
                          f"({formats.cli_one_line(e)})") from None
    return OpenedSource(spec, f"{spec.kind}-{digest}",
                        lambda: file_rows(spec.kind, spec.location, on_error, skipped), skipped)


def file_rows(kind: str, path: str, on_error: str, skipped: list,
              fields: formats.ReferenceFields | formats.HelpfulFields | None = None
              ) -> Iterator[TextRow]:
    """The TextRows of a reference or helpful file (JSONL or Parquet), streamed; `fields`
    maps the format's fields to the file's names (default: the format's own)."""
    if kind == "reference":
        fields = fields or formats.ReferenceFields()
        for row in formats.iter_rows(path, lambda s, o: formats.parse_reference(s, o, fields),
                                     dataclasses.astuple(fields), on_error, skipped):
            yield reference_text_row(row)
        return
    fields = fields or formats.HelpfulFields()
    for row in formats.iter_rows(path, lambda s, o: formats.parse_helpful(s, o, fields),
                                 dataclasses.astuple(fields), on_error, skipped):
        yield TextRow(row.instruction, row.output, kind="helpful", source=row.source)
