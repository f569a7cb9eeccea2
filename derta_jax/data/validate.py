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
or any other error in the data; 2 for a command-line problem, one line `error: ...` naming
the flag (an unknown flag or a bad value, FILE missing or not there, a --tokenizer that loads
nothing, a --refusal that is not one token, --max_length without --tokenizer); with
`--on_error=skip` every bad row is printed and the status is 0.
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
                  refusal: str = tokenize.DEFAULT_REFUSAL, out=None) -> int:
    """Prints the report (on `out`, sys.stdout when None); returns the exit status. Raises
    DataError/ValueError in raise mode."""
    out = sys.stdout if out is None else out
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


def _define_flags():
    """The command's flags: a fresh set per call (cli_flags.new_flag_values), so that main
    runs more than once in a process."""
    from absl import flags

    from derta_jax import cli_flags
    v = cli_flags.new_flag_values()
    flags.DEFINE_enum("format", "reference", list(formats.FORMATS), "Row format of FILE.",
                      flag_values=v)
    flags.DEFINE_enum("on_error", "raise", ["raise", "skip"],
                      "Stop at the first bad row, or skip and report each.", flag_values=v)
    flags.DEFINE_string("tokenizer", None, "Tokenizer directory: adds token-length statistics.",
                        flag_values=v)
    flags.DEFINE_integer("max_length", None, "Training max length (counts truncations).",
                         lower_bound=1, flag_values=v)
    flags.DEFINE_enum("template", "reference", ["reference", "chat", "plain"],
                      "Prompt format for triples/helpful files.", flag_values=v)
    flags.DEFINE_string("refusal", tokenize.DEFAULT_REFUSAL, "Refusal string (must be one token).",
                        flag_values=v)
    return v


def main(argv: Sequence[str] | None = None) -> int:
    """The command (argv: the program name first; sys.argv when None). A bad command line
    exits (SystemExit) with status 2 and one line `error: ...`; see the module docstring."""
    from derta_jax import cli_flags
    FLAGS = _define_flags()
    path = cli_flags.parse(sys.argv if argv is None else argv, FLAGS, positional=("FILE.jsonl",),
                           doc=__doc__)[1]
    if FLAGS.max_length is not None and not FLAGS.tokenizer:
        cli_flags.fail("--max_length needs --tokenizer (lengths are counted in tokens)")
    problem = formats.input_file_problem(path, path)
    tokenizer = None
    if problem is None and FLAGS.tokenizer:
        tokenizer, problem = formats.load_tokenizer_flag(FLAGS.tokenizer)
    if tokenizer is not None:
        try:
            tokenize.refusal_token_id(tokenizer, FLAGS.refusal)
        except ValueError as e:
            problem = f"--refusal={FLAGS.refusal}: {e}"
    if problem is not None:  # the command line's to fix
        cli_flags.fail(problem)
    try:
        return validate_file(path, FLAGS.format, FLAGS.on_error, tokenizer, FLAGS.max_length,
                             FLAGS.template, FLAGS.refusal)
    except formats.DataError as e:
        print(cli_flags.one_line(str(e)), file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {cli_flags.one_line(str(e))}", file=sys.stderr)
        return 1


def cli() -> None:
    """The console-script entry point (pyproject [project.scripts]), = python -m."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
