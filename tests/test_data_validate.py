"""The validate CLI: counts per kind, token-length statistics, exit status on bad rows."""

import io
import json
import os
import subprocess
import sys

import pytest

from derta_jax.data import validate
from derta_jax.data.formats import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference_file(tmp_path, rows, name="ref.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


ROWS = [
    {"prefix": "[INST] Add 2 and 3. [\\INST]", "text": " It is 5.<|end_of_text|>", "safe": "false"},
    {"prefix": "[INST] Rob a store. [\\INST]", "text": " Step 1: wait. Step 2: grab.<|end_of_text|>", "safe": "true"},
    {"prefix": "[INST] Rob a store. [\\INST] Step 1:", "text": " Sorry, no.<|end_of_text|>", "safe": "false"},
]


def test_length_stats_match_a_slow_nearest_rank_reference():
    lengths = [7, 3, 9, 1, 4, 4, 12, 30, 2, 5, 6]
    stats = validate.length_stats(lengths)
    ordered = sorted(lengths)
    n = len(ordered)

    def nearest_rank(q):  # the smallest value with at least q of the data at or below it
        return next(v for i, v in enumerate(ordered, start=1) if i >= q * n)

    assert stats == validate.LengthStats(n, min(lengths), sum(lengths) / n, nearest_rank(0.5),
                                         nearest_rank(0.95), max(lengths))


def test_counts_per_kind_without_a_tokenizer(tmp_path):
    path = _reference_file(tmp_path, ROWS)
    out = io.StringIO()
    assert validate.validate_file(path, "reference", out=out) == 0
    assert out.getvalue() == f"{path}: 3 rows (format=reference): mle=2, rto=1; skipped=0\n"


def test_token_statistics_with_a_tokenizer_agree_with_direct_tokenisation(tmp_path, llama3_tokenizer):
    tok = llama3_tokenizer
    path = _reference_file(tmp_path, ROWS)
    direct = [len(tok(r["prefix"] + r["text"])["input_ids"]) for r in ROWS]  # BOS + joint text
    max_length = sorted(direct)[1]  # the longest row goes over
    out = io.StringIO()
    assert validate.validate_file(path, "reference", tokenizer=tok, max_length=max_length, out=out) == 0
    lines = out.getvalue().splitlines()
    overall = validate.length_stats(direct)
    assert lines[2] == (f"  all: rows=3 min={overall.min} mean={overall.mean:.1f} p50={overall.p50} "
                        f"p95={overall.p95} max={overall.max}")
    longest = ROWS[direct.index(max(direct))]
    assert "  over max_length: 1 (responses that would lose their EOS); prompts leaving no room " \
           "for a response: 0" in lines
    assert lines[-1] == f"  truncated {path}:{ROWS.index(longest) + 1}"


def test_first_bad_row_raises_and_skip_reports_every_one(tmp_path):
    rows = [ROWS[0], {"prefix": "x", "text": "y"}, ROWS[1], {"prefix": "x", "text": "", "safe": "false"}]
    path = _reference_file(tmp_path, rows)
    with pytest.raises(DataError, match=f"^{path}:2: safe: missing"):
        validate.validate_file(path, "reference", out=io.StringIO())
    out = io.StringIO()
    assert validate.validate_file(path, "reference", on_error="skip", out=out) == 0
    assert out.getvalue().splitlines() == [
        f"skipped {path}:2: safe: missing (fields present: prefix, text)",
        f"skipped {path}:4: text: empty text",
        f"{path}: 2 rows (format=reference): mle=1, rto=1; skipped=2",
    ]


def test_triples_are_checked_as_refusal_and_rto_rows(tmp_path, small_tokenizer):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"question": "How do I pick a lock?", "safe_response": "Sorry, no.",
                                "harmful_response": "Step 1: rake the pins."}) + "\n", encoding="utf-8")
    out = io.StringIO()
    assert validate.validate_file(str(path), "triples", tokenizer=small_tokenizer,
                                  template_name="chat", out=out) == 0
    text = out.getvalue()
    assert "1 rows (format=triples): triples=1" in text
    assert "  refusal: rows=1 " in text and "  rto: rows=1 " in text


def _run(*args):
    return subprocess.run([sys.executable, "-m", "derta_jax.data.validate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_exits_non_zero_on_the_first_malformed_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes((json.dumps(ROWS[0]) + "\n").encode() + b'{"prefix": "a", "text": "b", "safe": "no"}\n')
    done = _run(str(path))
    assert done.returncode == 1
    assert done.stderr.strip() == f'{path}:2: safe: must be the string "true" or "false", got "no"'
    skipped = _run(str(path), "--on_error=skip")
    assert skipped.returncode == 0
    assert skipped.stdout.splitlines()[0] == f'skipped {path}:2: safe: must be the string "true" or "false", got "no"'
    wrong_format = _run(str(path), "--format=helpful")
    assert wrong_format.returncode == 1
    assert wrong_format.stderr.strip() == f"{path}:1: instruction: missing (fields present: prefix, safe, text)"


# every bad command line: (arguments, the one line on stderr); {file} is a good data file
BAD_COMMAND_LINES = [
    (["{file}", "--bogus"], "--bogus: unknown flag"),
    (["{file}", "--max_lenght=64"], "--max_lenght: unknown flag (did you mean --max_length?)"),
    (["{file}", "--max_length=abc"], "--max_length=abc: expected an integer"),
    (["{file}", "--max_length=0"], "--max_length=0: 0 is not a positive integer"),
    (["{file}", "--format=csv"], "--format=csv: value should be one of <reference|triples|helpful>"),
    (["{file}", "--tokenizer"], "--tokenizer: no value (write --tokenizer=VALUE)"),
    (["--format=reference"], "missing the FILE.jsonl argument (see --help)"),
    (["{file}", "extra.jsonl"], "unexpected argument 'extra.jsonl' (flags are written --name=value)"),
    (["{file}", "--max_length=64"], "--max_length needs --tokenizer (lengths are counted in tokens)"),
    (["{file}", "--tokenizer=/no/tok"], "--tokenizer=/no/tok: no such directory"),
    (["/missing.jsonl"], "/missing.jsonl: no such file"),
]


@pytest.mark.parametrize("args,line", BAD_COMMAND_LINES)
def test_bad_command_lines_are_one_line_with_exit_status_2(tmp_path, capsys, args, line):
    path = _reference_file(tmp_path, ROWS)
    with pytest.raises(SystemExit) as done:
        validate.main(["derta-validate", *(a.format(file=path) for a in args)])
    captured = capsys.readouterr()
    assert (done.value.code, captured.out) == (2, "")
    assert captured.err == f"error: {line}\n"  # one line, naming the flag or the file
    assert os.listdir(tmp_path) == ["ref.jsonl"]  # nothing written


def test_refusal_that_is_not_one_token_is_a_command_line_error(tmp_path, capsys, small_tokenizer_dir):
    path = _reference_file(tmp_path, ROWS)
    with pytest.raises(SystemExit) as done:
        validate.main(["derta-validate", path, f"--tokenizer={small_tokenizer_dir}",
                       "--refusal=Sorry, I cannot help"])
    captured = capsys.readouterr()
    assert (done.value.code, captured.out) == (2, "")
    assert captured.err.startswith("error: --refusal=Sorry, I cannot help: refusal string ")
    assert captured.err.count("\n") == 1


def test_main_runs_in_process_and_again(tmp_path, capsys):
    path = _reference_file(tmp_path, ROWS)
    assert validate.main(["derta-validate", path]) == 0
    assert validate.main(["derta-validate", path, "--format=reference"]) == 0  # fresh flags
    assert capsys.readouterr().out.count("3 rows (format=reference)") == 2


def test_python_m_missing_file_is_one_line_with_exit_status_2(tmp_path):
    """The one subprocess check of a bad command line: `python -m` parses the same way."""
    done = _run(str(tmp_path / "missing.jsonl"), "--on_error=skip")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"error: {tmp_path / 'missing.jsonl'}: no such file\n"
