"""Check a data file before a long run: rows per kind, token lengths, the first bad row.

    python -m derta_jax.data.validate FILE.jsonl [--format=reference|triples|helpful]
        [--tokenizer=DIR --max_length=N --template=reference|chat|plain --refusal=Sorry]
        [--on_error=raise|skip]

Without a tokenizer it parses every row (formats.py) and counts rows per kind. With one it
also tokenises every row exactly as training would (tokenize.py) and prints token-length
statistics per kind (min / mean / p50 / p95 / max), how many rows exceed max_length, how
many responses would lose their EOS to truncation and which prompts leave no room for a
response; it also checks that the refusal string is one token. Reference rows carry their
prompt already; triples are checked as their refusal row (q -> r) and their RTO row
(q -> r̂), helpful pairs as helpful rows, both in `--template`.

Exit status: 1 on the first malformed row (printed as `FILE:LINE: field: what is wrong`)
or any other error in the data; 2 for a command-line problem (a FILE or --tokenizer that
does not exist, --max_length without --tokenizer); with `--on_error=skip` every bad row is
printed and the status is 0.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Sequence

import numpy as np

from derta_jax.data import formats, tokenize
from derta_jax.data.templates import Example, example_from_reference_row, make_example, make_template


@dataclasses.dataclass(frozen=True)
class LengthStats:
    rows: int
    min: int
    mean: float
    p50: int
    p95: int
    max: int


def length_stats(lengths: Sequence[int]) -> LengthStats:
    """Nearest-rank percentiles (an observed length, never an interpolation)."""
    if not lengths:
        raise ValueError("length_stats needs at least one length")
    ordered = sorted(lengths)

    def rank(q: float) -> int:
        return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]

    return LengthStats(len(ordered), ordered[0], float(np.mean(ordered)), rank(0.50), rank(0.95),
                       ordered[-1])


def row_kinds(fmt: str, rows: Sequence[Any]) -> dict[str, int]:
    if fmt == "reference":
        rto = sum(row.safe for row in rows)
        return {"mle": len(rows) - rto, "rto": rto}
    return {fmt: len(rows)}


def examples_for(fmt: str, rows: Sequence[Any], template, eos: str) -> list[Example]:
    """The training examples a file's rows become (see the module docstring)."""
    if fmt == "reference":
        return [example_from_reference_row(row, eos) for row in rows]
    if fmt == "helpful":
        return [make_example(template, r.instruction, r.output, kind="helpful", source=r.source)
                for r in rows]
    examples = []
    for r in rows:
        examples.append(make_example(template, r.question, r.safe_response, kind="refusal",
                                     source=r.source))
        examples.append(make_example(template, r.question, r.harmful_response, rto=True,
                                     kind="rto", source=r.source))
    return examples


def _format_stats(name: str, stats: LengthStats) -> str:
    return (f"  {name}: rows={stats.rows} min={stats.min} mean={stats.mean:.1f} p50={stats.p50} "
            f"p95={stats.p95} max={stats.max}")


def validate_file(path: str, fmt: str, on_error: str = "raise", tokenizer: Any = None,
                  max_length: int | None = None, template_name: str = "reference",
                  refusal: str = tokenize.DEFAULT_REFUSAL, out=sys.stdout) -> int:
    """Prints the report; returns the exit status. Raises DataError/ValueError in raise mode."""
    result = formats.read_rows(path, fmt, on_error=on_error)
    for skipped in result.skipped:
        print(f"skipped {skipped}", file=out)
    kinds = ", ".join(f"{k}={n}" for k, n in row_kinds(fmt, result.rows).items())
    print(f"{path}: {len(result.rows)} rows (format={fmt}): {kinds}; "
          f"skipped={len(result.skipped)}", file=out)
    if tokenizer is None:
        return 0
    refusal_id = tokenize.refusal_token_id(tokenizer, refusal)
    template = make_template(template_name, tokenizer) if fmt != "reference" else None
    examples = examples_for(fmt, result.rows, template, tokenizer.eos_token)
    limit = max_length if max_length is not None else sys.maxsize
    rows, report = tokenize.tokenize_examples(examples, tokenizer, refusal_id, limit, on_error)
    for skipped in report.skipped:
        print(f"skipped {skipped}", file=out)
    print(f"tokens (refusal {refusal!r} = id {refusal_id}, max_length="
          f"{max_length if max_length is not None else 'none'}, template="
          f"{template_name if fmt != 'reference' else 'baked into prefix'}):", file=out)
    by_kind: dict[str, list[int]] = {}
    for row, length in zip(rows, report.full_lengths):
        by_kind.setdefault(row["kind"], []).append(length)
    if report.full_lengths:
        print(_format_stats("all", length_stats(report.full_lengths)), file=out)
        for kind in sorted(by_kind):
            print(_format_stats(kind, length_stats(by_kind[kind])), file=out)
    if max_length is not None:
        print(f"  over max_length: {len(report.truncated)} (responses that would lose their EOS); "
              f"prompts leaving no room for a response: {len(report.skipped)}", file=out)
        for source in report.truncated:
            print(f"  truncated {source}", file=out)
    return 0


def _main(argv) -> int:
    from absl import flags
    FLAGS = flags.FLAGS
    if len(argv) != 2:
        print("usage: python -m derta_jax.data.validate FILE.jsonl [--format=...]", file=sys.stderr)
        return 2
    if FLAGS.max_length is not None and not FLAGS.tokenizer:
        print("error: --max_length needs --tokenizer (lengths are counted in tokens)", file=sys.stderr)
        return 2
    problem = formats.input_file_problem(argv[1], argv[1])
    tokenizer = None
    if problem is None and FLAGS.tokenizer:
        tokenizer, problem = formats.load_tokenizer_flag(FLAGS.tokenizer)
    if problem is not None:  # the command line's to fix
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        return validate_file(argv[1], FLAGS.format, FLAGS.on_error, tokenizer, FLAGS.max_length,
                             FLAGS.template, FLAGS.refusal)
    except formats.DataError as e:
        print(str(e), file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def cli() -> None:
    """The console-script entry point (pyproject [project.scripts]), = python -m."""
    from absl import app, flags
    flags.DEFINE_enum("format", "reference", list(formats.FORMATS), "Row format of FILE.")
    flags.DEFINE_enum("on_error", "raise", ["raise", "skip"], "Stop at the first bad row, or skip and report each.")
    flags.DEFINE_string("tokenizer", None, "Tokenizer directory: adds token-length statistics.")
    flags.DEFINE_integer("max_length", None, "Training max length (counts truncations).")
    flags.DEFINE_enum("template", "reference", ["reference", "chat", "plain"],
                      "Prompt format for triples/helpful files.")
    flags.DEFINE_string("refusal", tokenize.DEFAULT_REFUSAL, "Refusal string (must be one token).")
    app.run(lambda argv: sys.exit(_main(argv)))


if __name__ == "__main__":
    cli()
