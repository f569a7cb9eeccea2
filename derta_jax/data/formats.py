"""Read and validate the three row formats, with errors that name FILE:LINE: field.

A 70B run that dies on row 41,337 after an hour of tokenisation is the failure this module
exists to prevent: every row is checked when it is read, and every problem is reported as
`FILE:LINE: field: what is wrong` (a `DataError`, a ValueError). The formats:

    reference  {"prefix": str, "text": str, "safe": "true" | "false"}   (the reference code's)
    triples    {"question": str, "safe_response": str, "harmful_response": str}
    helpful    {"instruction": str, "output": str}

Files are JSONL, or Parquet (by the `.parquet` suffix: the same fields as columns, ROW for
LINE, a boolean `safe` column allowed), local or remote (gs://, through epath), streamed.
Field names are configurable (`ReferenceFields`, `TripleFields`, `HelpfulFields`); extra
fields are ignored. Decisions about the edge cases, so that nothing happens silently:

- Lines are split on "\\n"; a trailing "\\r" (CRLF files) is removed.
- A UTF-8 byte-order mark at the very start of the file is accepted and stripped (editors
  on Windows write one). A BOM at the start of any later line is an error: it means files
  were concatenated with their BOMs, and the reader says so.
- Bytes that are not UTF-8 are an error naming the byte and its column.
- A blank (whitespace-only) line is an error; with `on_error="skip"` it is skipped and
  reported like any other bad row. The empty string after the file's final newline is not
  a line.
- Every text field must be a JSON string with some non-whitespace; `safe` must be the
  string "true" or "false" (the reference compares strings, so a JSON boolean there would
  silently mean "false" in the reference code).
- A triple's harmful response needs at least 3 words (whitespace-separated): the
  harmful-prefix cut keeps 1..n-2 words (derta_jax/data/mixture.py).

`on_error="raise"` raises on the first bad row; `on_error="skip"` returns the good rows and
a `SkippedRow(source, reason)` for every bad one, for the caller to report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, BinaryIO, Callable, Generic, Iterator, Literal, Sequence, TypeVar

OnError = Literal["raise", "skip"]
FORMATS = ("reference", "triples", "helpful")
MIN_HARMFUL_WORDS = 3
LINE_FIELD = "<line>"  # the "field" of an error about the whole line (JSON, encoding, blank)
_BOM = "\ufeff"


class DataError(ValueError):
    """A bad input row; str() is `SOURCE: field: what is wrong`, SOURCE being `FILE:LINE`."""

    def __init__(self, source: str, field: str, what: str):
        self.source = source
        self.field = field
        self.what = what
        super().__init__(f"{source}: {field}: {what}")


@dataclasses.dataclass(frozen=True)
class ReferenceRow:
    prefix: str
    text: str
    safe: bool  # True: an RTO row ("true" in the file); False: an MLE row
    source: str  # "path:line"


@dataclasses.dataclass(frozen=True)
class TripleRow:
    question: str
    safe_response: str
    harmful_response: str
    source: str


@dataclasses.dataclass(frozen=True)
class HelpfulRow:
    instruction: str
    output: str
    source: str


@dataclasses.dataclass(frozen=True)
class SkippedRow:
    source: str
    reason: str  # the DataError message without the source, "field: what is wrong"

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class ReferenceFields:
    prefix: str = "prefix"
    text: str = "text"
    safe: str = "safe"


@dataclasses.dataclass(frozen=True)
class TripleFields:
    question: str = "question"
    safe_response: str = "safe_response"
    harmful_response: str = "harmful_response"


@dataclasses.dataclass(frozen=True)
class HelpfulFields:
    instruction: str = "instruction"
    output: str = "output"


RowT = TypeVar("RowT")


@dataclasses.dataclass(frozen=True)
class ReadResult(Generic[RowT]):
    rows: tuple[RowT, ...]
    skipped: tuple[SkippedRow, ...]


def open_binary(path: str) -> BinaryIO:
    """A local file, or a remote one (gs://, s3://) through the path layer the workdir uses."""
    if "://" in path:
        from derta_jax import paths

        return paths.resolve(path).open("rb")
    return open(path, "rb")


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes (local or remote): the identity of a data file in caches
    and provenance."""
    digest = hashlib.sha256()
    with open_binary(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def decoded_lines(path: str) -> Iterator[tuple[str, str | DataError]]:
    """Yields (source, text of the line) or (source, DataError) for every line of `path`.

    Public so that other JSONL readers (attack sets, human labels) report bad lines with
    the same FILE:LINE messages as the training formats.

    Streams the file in binary, so one bad byte costs one row, not the file, and line
    numbers count "\n" only (never the other characters str.splitlines() splits on).
    """
    with open_binary(path) as f:
        for number, chunk in enumerate(f, start=1):
            source = f"{path}:{number}"
            chunk = chunk.removesuffix(b"\n").removesuffix(b"\r")
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                yield source, DataError(source, LINE_FIELD, f"not valid UTF-8: byte "
                                        f"0x{chunk[e.start]:02x} at column {e.start + 1}")
                continue
            if text.startswith(_BOM):
                if number == 1:
                    text = text[len(_BOM):]
                else:
                    yield source, DataError(
                        source, LINE_FIELD,
                        "UTF-8 byte-order mark (BOM) at the start of a line other than the first "
                        "(were files with BOMs concatenated?); remove it")
                    continue
            yield source, text


def parse_object(source: str, text: str) -> dict:
    """The JSON object on one line; a DataError naming `source` for a blank line, invalid
    JSON or a value that is not an object (so every JSONL reader fails the same way)."""
    if not text.strip():
        raise DataError(source, LINE_FIELD, "blank line (remove it, or pass on_error=skip)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(source, LINE_FIELD, f"invalid JSON: {e.msg} at column {e.colno}") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise DataError(source, LINE_FIELD, f"invalid JSON: {str(e).split(':')[0]}") from None
    except RecursionError:
        raise DataError(source, LINE_FIELD, "invalid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise DataError(source, LINE_FIELD, f"expected a JSON object, got {_json_type(value)}")
    return value


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def text_field(source: str, obj: dict, name: str) -> str:
    """`obj[name]` as a non-blank string, or a DataError naming `source` and the field
    (missing, not a string, or only whitespace)."""
    if name not in obj:
        raise DataError(source, name, f"missing (fields present: {', '.join(sorted(obj)) or 'none'})")
    value = obj[name]
    if not isinstance(value, str):
        raise DataError(source, name, f"expected a string, got {_json_type(value)}")
    if not value.strip():
        raise DataError(source, name, "empty text")
    return value


def _safe_field(source: str, obj: dict, name: str) -> bool:
    if name not in obj:
        raise DataError(source, name, f"missing (fields present: {', '.join(sorted(obj)) or 'none'})")
    value = obj[name]
    if not isinstance(value, str) or value not in ("true", "false"):
        raise DataError(source, name, f'must be the string "true" or "false", got {json.dumps(value)}')
    return value == "true"


def parse_reference(source: str, obj: dict, fields: ReferenceFields = ReferenceFields()) -> ReferenceRow:
    return ReferenceRow(
        prefix=text_field(source, obj, fields.prefix),
        text=text_field(source, obj, fields.text),
        safe=_safe_field(source, obj, fields.safe),
        source=source)


def parse_triple(source: str, obj: dict, fields: TripleFields = TripleFields()) -> TripleRow:
    row = TripleRow(
        question=text_field(source, obj, fields.question),
        safe_response=text_field(source, obj, fields.safe_response),
        harmful_response=text_field(source, obj, fields.harmful_response),
        source=source)
    words = len(row.harmful_response.split())
    if words < MIN_HARMFUL_WORDS:
        raise DataError(
            source, fields.harmful_response,
            f"has {words} word{'s' if words != 1 else ''}; the harmful-prefix cut needs at least "
            f"{MIN_HARMFUL_WORDS}")
    return row


def parse_helpful(source: str, obj: dict, fields: HelpfulFields = HelpfulFields()) -> HelpfulRow:
    return HelpfulRow(
        instruction=text_field(source, obj, fields.instruction),
        output=text_field(source, obj, fields.output),
        source=source)


def is_parquet(path: str) -> bool:
    return path.lower().endswith(".parquet")


def parquet_objects(path: str, columns: Sequence[str]) -> Iterator[tuple[str, dict]]:
    """Every row of a Parquet file as (`FILE:ROW`, {column: value}), ROW counting from 1,
    read a record batch at a time. A mapped column the file lacks is one DataError naming
    the file and the field, before any row; booleans become the strings "true"/"false" (the
    reference format's `safe`), so a Parquet row parses exactly as its JSONL line would."""
    import pyarrow.parquet as pq

    with open_binary(path) as handle:
        try:
            table = pq.ParquetFile(handle)
        except Exception as e:  # pyarrow.ArrowInvalid and friends: not a Parquet file
            raise DataError(path, LINE_FIELD, f"not a readable Parquet file ({e})") from None
        names = table.schema_arrow.names
        for column in columns:
            if column not in names:
                raise DataError(path, column, f"no such column (the file has: "
                                              f"{', '.join(names) or 'none'})")
        number = 0
        for batch in table.iter_batches(batch_size=1024, columns=list(columns)):
            for obj in batch.to_pylist():
                number += 1
                yield f"{path}:{number}", {k: ("true" if v else "false") if isinstance(v, bool)
                                           else v for k, v in obj.items()}


def iter_objects(path: str, columns: Sequence[str] = ()) -> Iterator[tuple[str, dict | DataError]]:
    """(source, object) for every row of a JSONL or Parquet (by its suffix) file, local or
    remote; a bad JSONL line is (source, DataError). `columns`: the fields a Parquet file
    must have (JSONL rows are checked field by field when parsed)."""
    if is_parquet(path):
        yield from parquet_objects(path, columns)
        return
    for source, text in decoded_lines(path):
        if isinstance(text, DataError):
            yield source, text
            continue
        try:
            yield source, parse_object(source, text)
        except DataError as e:
            yield source, e


def iter_rows(path: str, parse: Callable[[str, dict], RowT], columns: Sequence[str],
              on_error: OnError, skipped: list) -> Iterator[RowT]:
    """The rows of `path`, streamed: bad ones raise (on_error="raise") or are appended to
    `skipped` as SkippedRow and left out."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f'on_error must be "raise" or "skip", got {on_error!r}')
    for source, obj in iter_objects(path, columns):
        try:
            if isinstance(obj, DataError):
                raise obj
            row = parse(source, obj)
        except DataError as e:
            if on_error == "raise":
                raise
            skipped.append(SkippedRow(source, f"{e.field}: {e.what}"))
            continue
        yield row


def _read(path: str, parse: Callable[[str, dict], RowT], on_error: OnError,
          columns: Sequence[str] = ()) -> ReadResult[RowT]:
    skipped: list = []
    rows = tuple(iter_rows(path, parse, columns, on_error, skipped))
    return ReadResult(rows, tuple(skipped))


def read_json_objects(path: str, on_error: OnError = "raise") -> ReadResult[tuple[str, dict]]:
    """Every line as (source, JSON object), with this module's line checks (encoding, BOM,
    blank lines, JSON) but no field checks: for JSONL formats defined elsewhere."""
    if is_parquet(path):
        raise DataError(path, LINE_FIELD, "expected a JSONL file, not Parquet")
    return _read(path, lambda source, obj: (source, obj), on_error)


def read_reference(path: str, fields: ReferenceFields = ReferenceFields(),
                   on_error: OnError = "raise") -> ReadResult[ReferenceRow]:
    return _read(path, lambda s, o: parse_reference(s, o, fields), on_error,
                 dataclasses.astuple(fields))


def read_triples(path: str, fields: TripleFields = TripleFields(),
                 on_error: OnError = "raise") -> ReadResult[TripleRow]:
    return _read(path, lambda s, o: parse_triple(s, o, fields), on_error,
                 dataclasses.astuple(fields))


def read_helpful(path: str, fields: HelpfulFields = HelpfulFields(),
                 on_error: OnError = "raise") -> ReadResult[HelpfulRow]:
    return _read(path, lambda s, o: parse_helpful(s, o, fields), on_error,
                 dataclasses.astuple(fields))


def read_rows(path: str, format: str, fields=None, on_error: OnError = "raise") -> ReadResult:
    """Reads `path` as one of FORMATS; `fields` defaults to that format's standard names."""
    readers = {"reference": (read_reference, ReferenceFields),
                          "triples": (read_triples, TripleFields),
                          "helpful": (read_helpful, HelpfulFields)}
    if format not in readers:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    reader, default_fields = readers[format]
    return reader(path, fields if fields is not None else default_fields(), on_error)


def reference_row_to_json(row: ReferenceRow, fields: ReferenceFields = ReferenceFields()) -> str:
    """One line of the reference format (no newline); keys in the reference's order."""
    return json.dumps({fields.prefix: row.prefix, fields.text: row.text,
                       fields.safe: "true" if row.safe else "false"}, ensure_ascii=False)


# --- command-line inputs of the data commands (mixture, validate) ------------------------


def cli_one_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def input_file_problem(label: str, path: str) -> str | None:
    """Why a command cannot read its input file `path`, as `LABEL: no such file` (LABEL
    names the flag, e.g. `--triples=PATH`), or None for a regular file. The data commands
    print it as `error: ...` with exit status 2, before reading anything."""
    if "://" in path:
        from derta_jax import paths

        try:
            remote = paths.resolve(path)
            if remote.is_dir():
                return f"{label}: is a directory, not a file"
            return None if remote.exists() else f"{label}: no such file"
        except (ValueError, ImportError, OSError) as e:  # scheme, filesystem package, credentials
            return f"{label}: cannot be read ({cli_one_line(e)})"
    if os.path.isdir(path):
        return f"{label}: is a directory, not a file"
    if not os.path.exists(path):
        return f"{label}: no such file"
    return None


def load_tokenizer_flag(directory: str) -> tuple[Any, str | None]:
    """(tokenizer, None), or (None, `--tokenizer=DIR: what is wrong`) when none loads from
    DIR (missing, no tokenizer files, not a fast tokenizer)."""
    if not os.path.isdir(directory):
        return None, f"--tokenizer={directory}: no such directory"
    from derta_jax.data.tokenizer_builder import load_tokenizer

    try:
        return load_tokenizer(directory), None
    except (OSError, ValueError) as e:  # transformers' message can run to several lines
        why = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(": ")
        return None, f"--tokenizer={directory}: no tokenizer loads from it ({why})"
