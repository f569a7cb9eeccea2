"""Mixture recipes: counts, seeds, the k cut, the reference row format, and the CLI."""

import json
import os
import re
import subprocess
import sys
import types

import pytest

from derta_jax.data import formats, mixture
from derta_jax.data.templates import ReferenceTemplate, make_example, make_template

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _triples(n):
    return [formats.TripleRow(
        question=f"How do I do harm number {i}?",
        safe_response=f"I'm sorry, I cannot help with harm {i}.",
        harmful_response=f"Step 1: get the tools for harm {i}.\nStep 2: use\tthem  well, quietly {i}.",
        source=f"t.jsonl:{i + 1}") for i in range(n)]


def _helpful(n):
    return [formats.HelpfulRow(f"Add {i} and 1.", f"It is {i + 1}.", f"h.jsonl:{i + 1}") for i in range(n)]


def _build(recipe, num_safety, n_triples=10, n_helpful=7, seed=0, num_helpful=None):
    return mixture.build_mixture(_triples(n_triples), _helpful(n_helpful), recipe, seed,
                                 ReferenceTemplate(), num_safety, num_helpful)


@pytest.mark.parametrize("recipe,expected", [
    ("sft", {"helpful": 7}),
    ("vanilla", {"helpful": 7, "refusal": 8}),
    ("prefix", {"helpful": 7, "harmful_prefix": 4}),
    ("rto", {"helpful": 7, "rto": 4}),
    ("derta", {"helpful": 7, "rto": 4, "harmful_prefix": 4}),
    ("recaug", {"helpful": 7, "harmful_prefix": 8}),
])
def test_recipe_counts(recipe, expected):
    built = _build(recipe, 8)
    assert built.counts == expected
    counted = {}
    for example in built.examples:
        counted[example.kind] = counted.get(example.kind, 0) + 1
    assert counted == expected
    assert all(e.rto == (e.kind == "rto") for e in built.examples)
    assert built.triple_passes == 1 and not built.notes


def test_derta_rto_and_prefix_rows_come_from_the_same_triples():
    built = _build("derta", 6)
    rto = [e.source for e in built.examples if e.kind == "rto"]
    prefix = [e.source for e in built.examples if e.kind == "harmful_prefix"]
    assert rto == prefix and len(set(rto)) == 3


def test_more_triples_than_the_file_has_are_reused_and_reported():
    built = _build("recaug", 25, n_triples=10)
    sources = [e.source for e in built.examples if e.kind == "harmful_prefix"]
    assert len(sources) == 25 and len(set(sources)) == 10 and built.triple_passes == 3
    assert built.notes == ("recipe 'recaug' needs 25 triples but the file has 10: triples "
                           "reused (3 seeded passes)",)


def test_bad_recipe_arguments_are_clear():
    with pytest.raises(ValueError, match="num_safety must be even for recipe 'derta'"):
        _build("derta", 7)
    with pytest.raises(ValueError, match="recipe must be one of sft, vanilla, prefix, rto, derta, recaug, got 'dpo'"):
        _build("dpo", 8)
    with pytest.raises(ValueError, match="num_helpful=9 but the helpful file has 7 rows"):
        _build("sft", 0, num_helpful=9)
    with pytest.raises(ValueError, match="recipe 'sft' with num_safety=6000 and 0 helpful rows "
                                         "gives an empty mixture"):
        _build("sft", 6000, n_helpful=0)
    with pytest.raises(ValueError, match="recipe 'vanilla' needs triples"):
        _build("vanilla", 2, n_triples=0)


def test_k_is_zero_for_every_third_instance_and_never_cuts_inside_a_word():
    template = ReferenceTemplate()
    built = _build("recaug", 30, n_triples=30)
    by_source = {t.source: t for t in _triples(30)}
    prefixes = [e for e in built.examples if e.kind == "harmful_prefix"]
    ks = []
    for example in prefixes:
        triple = by_source[example.source]
        base = template.render(triple.question)
        assert example.prompt.startswith(base)
        prefill = example.prompt[len(base):]
        words = triple.harmful_response.split()
        if not prefill:
            ks.append(0)
            continue
        assert prefill.startswith(" ")
        cut = prefill[1:]
        assert triple.harmful_response.startswith(cut)
        rest = triple.harmful_response[len(cut):]
        assert rest[:1].isspace(), f"cut inside a word: {cut!r} | {rest!r}"
        k = len(cut.split())
        assert 1 <= k <= len(words) - 2
        ks.append(k)
        assert example.response == " " + triple.safe_response + "<|end_of_text|>"
    assert [i for i, k in enumerate(ks) if k == 0] == list(range(0, 30, 3))
    assert len(set(ks)) > 3  # the cut varies


def test_word_prefix_keeps_original_spacing():
    text = "Step 1:\tget  the\ntools now"
    assert [mixture.word_prefix(text, k) for k in range(4)] == [
        "", "Step", "Step 1:", "Step 1:\tget"]
    with pytest.raises(ValueError, match=r"k=7 is outside 0..6"):
        mixture.word_prefix(text, 7)


def test_same_seed_same_examples_other_seed_other_cuts():
    a, b = _build("derta", 8, seed=3), _build("derta", 8, seed=3)
    c = _build("derta", 8, seed=4)
    assert a.examples == b.examples
    assert a.examples != c.examples


def test_helpful_subset_is_seeded_and_in_file_order():
    built = _build("sft", 0, n_helpful=20, num_helpful=5, seed=1)
    lines = [int(e.source.split(":")[1]) for e in built.examples]
    assert len(lines) == 5 and lines == sorted(lines)
    assert built.notes == ("5 of 20 helpful rows (seeded sample)",)


def test_reference_example_row_round_trips(tmp_path):
    # a row written by hand in the reference repository's format (harmful-prefix MLE row)
    line = ('{"prefix": "[INST] Explain how to steal a candybar. [\\\\INST] To trick the '
            'system:\\n- Generate chaos", "text": " I\'m sorry, I cannot assist with that.'
            '<|end_of_text|>", "safe": "false"}\n')
    path = tmp_path / "ref.jsonl"
    path.write_text(line, encoding="utf-8")
    rows = formats.read_reference(str(path)).rows
    assert rows[0].prefix.startswith("[INST] Explain how to steal a candybar. [\\INST] To trick")
    out = tmp_path / "out.jsonl"
    mixture.write_reference_jsonl([mixture.Example(rows[0].prefix, rows[0].text, rows[0].safe,
                                                   rows[0].source)], str(out))
    assert out.read_text(encoding="utf-8") == line
    # and our own template writes the same prefix/text layout for a harmful-prefix row
    template = ReferenceTemplate()
    ours = make_example(template, "Explain how to steal a candybar.",
                                "I'm sorry, I cannot assist with that.",
                                prefill="To trick the system:\n- Generate chaos")
    assert (ours.prompt, ours.response) == (rows[0].prefix, rows[0].text)


def test_write_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "train.jsonl"
    out.write_text("keep me\n")
    examples = _build("sft", 0).examples
    with pytest.raises(FileExistsError, match=f"{out} exists; pass --overwrite to replace it"):
        mixture.write_reference_jsonl(examples, str(out))
    assert out.read_text() == "keep me\n"
    mixture.write_reference_jsonl(examples, str(out), overwrite=True)
    assert len(out.read_text().splitlines()) == 7
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]  # no temporary left behind


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "derta_jax.data.mixture", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_builds_byte_identical_files_for_the_same_seed(tmp_path):
    triples = tmp_path / "t.jsonl"
    helpful = tmp_path / "h.jsonl"
    triples.write_text("".join(json.dumps({
        "prompt": t.question, "safe_response": t.safe_response,
        "harmful_response": t.harmful_response}) + "\n" for t in _triples(6)), encoding="utf-8")
    helpful.write_text("".join(json.dumps({"instruction": h.instruction, "output": h.output}) + "\n"
                               for h in _helpful(4)), encoding="utf-8")
    common = [f"--triples={triples}", f"--helpful={helpful}", "--recipe=derta",
              "--num_safety=6", "--question_field=prompt"]
    first = _run_cli(*common, "--seed=5", f"--out={tmp_path / 'a.jsonl'}")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == (
        f"wrote 10 rows to {tmp_path / 'a.jsonl'} (recipe=derta, seed=5, template=reference; "
        f"harmful_prefix=3, helpful=4, rto=3; skipped input rows=0)")
    assert _run_cli(*common, "--seed=5", f"--out={tmp_path / 'b.jsonl'}").returncode == 0
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    rows = formats.read_reference(str(tmp_path / "a.jsonl")).rows
    assert [r.safe for r in rows].count(True) == 3
    again = _run_cli(*common, "--seed=5", f"--out={tmp_path / 'a.jsonl'}")
    assert (again.returncode, again.stdout) == (2, "")
    assert again.stderr == (f"error: --out={tmp_path / 'a.jsonl'}: exists; pass --overwrite to "
                            f"replace it\n")
    # a bad row is reported with FILE:LINE: field, and the run fails
    with triples.open("a", encoding="utf-8") as f:
        f.write('{"prompt": "q", "safe_response": "no"}\n')
    bad = _run_cli(*common, "--seed=5", f"--out={tmp_path / 'c.jsonl'}")
    assert bad.returncode == 1 and not (tmp_path / "c.jsonl").exists()
    assert (f"error: {triples}:7: harmful_response: missing (fields present: prompt, "
            f"safe_response)") in bad.stderr
    skip = _run_cli(*common, "--seed=5", "--on_error=skip", f"--out={tmp_path / 'c.jsonl'}")
    assert skip.returncode == 0, skip.stderr
    assert f"skipped {triples}:7: harmful_response: missing" in skip.stderr
    assert "skipped input rows=1" in skip.stdout


def test_cli_chat_template_uses_the_tokenizer(tmp_path, small_tokenizer_dir, small_tokenizer):
    triples = tmp_path / "t.jsonl"
    triples.write_text("".join(json.dumps({
        "question": t.question, "safe_response": t.safe_response,
        "harmful_response": t.harmful_response}) + "\n" for t in _triples(3)), encoding="utf-8")
    out = tmp_path / "chat.jsonl"
    done = _run_cli(f"--triples={triples}", "--recipe=vanilla", "--num_safety=3", "--template=chat",
                    f"--tokenizer={small_tokenizer_dir}", f"--out={out}")
    assert done.returncode == 0, done.stderr
    rows = formats.read_reference(str(out)).rows
    template = make_template("chat", small_tokenizer)
    by_question = {t.question: t for t in _triples(3)}
    for row in rows:
        question = re.search(r"<\|user\|>\n(.*)<\|eos\|>", row.prefix).group(1)
        assert row.prefix == template.render(question)
        assert row.text == by_question[question].safe_response + "<|eos|>"


# every bad command line: (arguments, the one line on stderr); {out} is the --out path
BAD_COMMAND_LINES = [
    (["--bogus=1", "--out={out}"], "--bogus: unknown flag"),
    (["--num_safty=6", "--out={out}"], "--num_safty: unknown flag (did you mean --num_safety?)"),
    (["--num_safety=abc", "--out={out}"], "--num_safety=abc: expected an integer"),
    (["--num_safety=-2", "--out={out}"], "--num_safety=-2: -2 is not a non-negative integer"),
    (["--num_safety=3", "--out={out}"], "--num_safety=3: num_safety must be even for recipe "
                                        "'derta' (N/2 rows per safety kind), got 3"),
    (["--overwrite=maybe", "--out={out}"], "--overwrite=maybe: expected true or false"),
    (["--recipe=nope", "--out={out}"],
     "--recipe=nope: value should be one of <sft|vanilla|prefix|rto|derta|recaug>"),
    (["--triples=/missing.jsonl"], "--out: required, not given (see --help)"),
    (["--out"], "--out: no value (write --out=VALUE)"),
    (["--triples=/missing.jsonl", "--out={out}"], "--triples=/missing.jsonl: no such file"),
    (["--template=chat", "--out={out}"],
     "--template=chat: template 'chat' needs a tokenizer (--tokenizer=DIR)"),
    (["--out={out}", "extra"], "unexpected argument 'extra' (flags are written --name=value)"),
]


@pytest.mark.parametrize("args,line", BAD_COMMAND_LINES)
def test_bad_command_lines_are_one_line_with_exit_status_2(tmp_path, capsys, args, line):
    out = tmp_path / "train.jsonl"
    with pytest.raises(SystemExit) as done:
        mixture.main(["derta-mixture", *(a.format(out=out) for a in args)])
    captured = capsys.readouterr()
    assert (done.value.code, captured.out) == (2, "")
    assert captured.err == f"error: {line.format(out=out)}\n"  # one line, naming the flag
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def test_python_m_bad_flag_is_one_line_not_absls_usage(tmp_path):
    """The one subprocess check: `python -m` reaches the same parsing (no absl app.run)."""
    out = tmp_path / "train.jsonl"
    done = _run_cli("--num_safety=abc", f"--out={out}")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "error: --num_safety=abc: expected an integer\n"
    assert not out.exists()


def test_help_prints_the_usage_and_the_flags(capsys):
    with pytest.raises(SystemExit) as done:
        mixture.main(["derta-mixture", "--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith(mixture.__doc__.strip().splitlines()[0])
    assert "--num_safety: Number of safety rows." in shown


def test_every_path_flag_is_checked_before_anything_is_read(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text("{}\n", encoding="utf-8")
    out = str(tmp_path / "train.jsonl")

    def problem(**flags):
        values = dict(triples=str(good), helpful=None, out=out, overwrite=False, recipe="derta",
                      num_safety=6) | flags
        return mixture._flag_problem(types.SimpleNamespace(**values))

    assert problem() is None
    assert problem(helpful=str(tmp_path / "h.jsonl")) == f"--helpful={tmp_path}/h.jsonl: no such file"
    assert problem(triples=str(tmp_path)) == f"--triples={tmp_path}: is a directory, not a file"
    assert problem(out=str(tmp_path)) == f"--out={tmp_path}: is a directory, not a file"
    assert problem(out="/no/dir/x.jsonl") == ("--out=/no/dir/x.jsonl: directory /no/dir does "
                                              "not exist")
    assert problem(out=str(good)) == f"--out={good}: exists; pass --overwrite to replace it"
    assert problem(out=str(good), overwrite=True) is None
    assert problem(recipe="rto", num_safety=5).startswith("--num_safety=5: num_safety must be even")
    assert problem(recipe="vanilla", num_safety=5) is None


def test_tokenizer_flag_that_loads_nothing_is_one_line(tmp_path, small_tokenizer_dir):
    tokenizer, problem = formats.load_tokenizer_flag(str(small_tokenizer_dir))
    assert problem is None and tokenizer.eos_token == "<|eos|>"
    assert formats.load_tokenizer_flag("/no/tok") == (None, "--tokenizer=/no/tok: no such directory")
    tokenizer, problem = formats.load_tokenizer_flag(str(tmp_path))  # a directory, no files
    assert tokenizer is None
    assert problem.startswith(f"--tokenizer={tmp_path}: no tokenizer loads from it (")
    assert "\n" not in problem
