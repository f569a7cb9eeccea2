"""Row formats: every bad input gives the exact `FILE:LINE: field: what is wrong`."""

import json

import pytest

from derta_jax.data import formats
from derta_jax.data.formats import DataError


def _write(tmp_path, name, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _lines(*objects) -> bytes:
    return "".join(json.dumps(o) + "\n" for o in objects).encode("utf-8")


GOOD_REF = {"prefix": "[INST] Hi [\\INST]", "text": " Hello there.<|end_of_text|>", "safe": "false"}
GOOD_TRIPLE = {"question": "How do I pick a lock?", "safe_response": "Sorry, I cannot help.",
               "harmful_response": "Step 1: get a pick. Step 2: rake it."}
GOOD_HELPFUL = {"instruction": "Add 2 and 3.", "output": "5"}


def _error(path, format):
    with pytest.raises(DataError) as info:
        formats.read_rows(path, format)
    return str(info.value)


def test_good_rows_of_each_format_parse_with_their_source(tmp_path):
    ref = _write(tmp_path, "r.jsonl", _lines(GOOD_REF, {**GOOD_REF, "safe": "true"}))
    rows = formats.read_reference(ref).rows
    assert [r.safe for r in rows] == [False, True]
    assert rows[1] == formats.ReferenceRow(GOOD_REF["prefix"], GOOD_REF["text"], True, f"{ref}:2")
    tri = _write(tmp_path, "t.jsonl", _lines(GOOD_TRIPLE))
    assert formats.read_triples(tri).rows[0].harmful_response == GOOD_TRIPLE["harmful_response"]
    hel = _write(tmp_path, "h.jsonl", _lines(GOOD_HELPFUL))
    assert formats.read_helpful(hel).rows == (formats.HelpfulRow("Add 2 and 3.", "5", f"{hel}:1"),)


@pytest.mark.parametrize("line,format,expected", [
    (b'{"prefix": "a", "text": "b", "safe": "false"', "reference",
     "<line>: invalid JSON: Expecting ',' delimiter at column 45"),  # just past the last byte
    (b'["prefix", "text"]', "reference", "<line>: expected a JSON object, got an array"),
    (b'{"prefix": "a", "safe": "false"}', "reference", "text: missing (fields present: prefix, safe)"),
    (b'{"prefix": "a", "text": 3, "safe": "false"}', "reference", "text: expected a string, got a number"),
    (b'{"prefix": "a", "text": "b", "safe": true}', "reference",
     'safe: must be the string "true" or "false", got true'),
    (b'{"prefix": "a", "text": "b", "safe": "yes"}', "reference",
     'safe: must be the string "true" or "false", got "yes"'),
    (b'{"prefix": "a", "text": "  ", "safe": "false"}', "reference", "text: empty text"),
    (b'{"instruction": "", "output": "b"}', "helpful", "instruction: empty text"),
    (b'{"instruction": "a", "output": null}', "helpful", "output: expected a string, got null"),
    (b'{"question": "q", "safe_response": "r", "harmful_response": "two words"}', "triples",
     "harmful_response: has 2 words; the harmful-prefix cut needs at least 3"),
    (b'{"question": "q", "safe_response": "r", "harmful_response": "one"}', "triples",
     "harmful_response: has 1 word; the harmful-prefix cut needs at least 3"),
    (b'{"question": "q", "safe_response": "\xff r", "harmful_response": "a b c"}', "triples",
     "<line>: not valid UTF-8: byte 0xff at column 37"),
    (b"   ", "helpful", "<line>: blank line (remove it, or pass on_error=skip)"),
])
def test_bad_row_on_line_two_names_file_line_and_field(tmp_path, line, format, expected):
    good = {"reference": GOOD_REF, "triples": GOOD_TRIPLE, "helpful": GOOD_HELPFUL}[format]
    path = _write(tmp_path, "bad.jsonl", _lines(good) + line + b"\n" + _lines(good))
    assert _error(path, format) == f"{path}:2: {expected}"


def test_custom_field_names_are_used_and_named_in_errors(tmp_path):
    fields = formats.TripleFields(question="prompt", safe_response="chosen", harmful_response="rejected")
    path = _write(tmp_path, "t.jsonl", _lines(
        {"prompt": "q?", "chosen": "No.", "rejected": "Sure, here it is."}, {"prompt": "q?", "chosen": "No."}))
    with pytest.raises(DataError, match=f"^{path}:2: rejected: missing "):
        formats.read_triples(path, fields)
    result = formats.read_triples(path, fields, on_error="skip")
    assert [r.question for r in result.rows] == ["q?"]


def test_bom_at_file_start_is_stripped_and_elsewhere_is_an_error(tmp_path):
    with_bom = _write(tmp_path, "bom.jsonl", b"\xef\xbb\xbf" + _lines(GOOD_HELPFUL))
    without = _write(tmp_path, "plain.jsonl", _lines(GOOD_HELPFUL))
    assert formats.read_helpful(with_bom).rows[0].instruction == formats.read_helpful(without).rows[0].instruction
    concatenated = _write(tmp_path, "cat.jsonl", _lines(GOOD_HELPFUL) + b"\xef\xbb\xbf" + _lines(GOOD_HELPFUL))
    assert _error(concatenated, "helpful") == (
        f"{concatenated}:2: <line>: UTF-8 byte-order mark (BOM) at the start of a line other than "
        f"the first (were files with BOMs concatenated?); remove it")


def test_crlf_line_ends_give_the_same_rows_as_lf(tmp_path):
    lf = _lines(GOOD_TRIPLE, GOOD_TRIPLE)
    crlf = _write(tmp_path, "crlf.jsonl", lf.replace(b"\n", b"\r\n"))
    rows = formats.read_triples(crlf).rows
    assert len(rows) == 2 and rows[1].safe_response == GOOD_TRIPLE["safe_response"]
    assert rows[1].source == f"{crlf}:2"


def test_skip_mode_returns_every_bad_row_with_its_reason_and_keeps_the_good_ones(tmp_path):
    data = _lines(GOOD_HELPFUL) + b"\n" + b"{oops\n" + _lines({"instruction": "x"}, GOOD_HELPFUL)
    path = _write(tmp_path, "mixed.jsonl", data)
    result = formats.read_helpful(path, on_error="skip")
    assert [r.source for r in result.rows] == [f"{path}:1", f"{path}:5"]
    assert [str(s) for s in result.skipped] == [
        f"{path}:2: <line>: blank line (remove it, or pass on_error=skip)",
        f"{path}:3: <line>: invalid JSON: Expecting property name enclosed in double quotes at column 2",
        f"{path}:4: output: missing (fields present: instruction)",
    ]
    with pytest.raises(DataError, match=f"^{path}:2: <line>: blank line"):
        formats.read_helpful(path)


def test_file_without_final_newline_and_unknown_options_are_clear(tmp_path):
    path = _write(tmp_path, "h.jsonl", _lines(GOOD_HELPFUL).rstrip(b"\n"))
    assert len(formats.read_helpful(path).rows) == 1
    with pytest.raises(ValueError, match="on_error must be \"raise\" or \"skip\", got 'ignore'"):
        formats.read_helpful(path, on_error="ignore")
    with pytest.raises(ValueError, match="format must be one of reference, triples, helpful, got 'csv'"):
        formats.read_rows(path, "csv")


def test_reference_row_json_round_trips(tmp_path):
    row = formats.ReferenceRow('[INST] "q" [\\INST]', " ü\n<|end_of_text|>", True, "x:1")
    path = _write(tmp_path, "r.jsonl", (formats.reference_row_to_json(row) + "\n").encode())
    back = formats.read_reference(path).rows[0]
    assert (back.prefix, back.text, back.safe) == (row.prefix, row.text, row.safe)
    assert list(json.loads(open(path).read())) == ["prefix", "text", "safe"]


def test_read_json_objects_applies_the_line_checks_only(tmp_path):
    path = _write(tmp_path, "any.jsonl", b'{"anything": 1}\n\n[1]\n')
    result = formats.read_json_objects(path, on_error="skip")
    assert result.rows == ((f"{path}:1", {"anything": 1}),)
    assert [str(s) for s in result.skipped] == [
        f"{path}:2: <line>: blank line (remove it, or pass on_error=skip)",
        f"{path}:3: <line>: expected a JSON object, got an array"]


def test_public_line_helpers_give_the_readers_messages(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": "x"}\n\xff\n[1]\n \n{"a": " "}\n')
    lines = list(formats.decoded_lines(str(path)))
    assert [source for source, _ in lines] == [f"{path}:{n}" for n in range(1, 6)]
    assert isinstance(lines[1][1], DataError) and "not valid UTF-8: byte 0xff" in str(lines[1][1])
    source, text = lines[0]
    assert formats.text_field(source, formats.parse_object(source, text), "a") == "x"
    with pytest.raises(DataError, match=r":3: .*expected a JSON object, got an array"):
        formats.parse_object(*lines[2])
    with pytest.raises(DataError, match=r":4: .*blank line"):
        formats.parse_object(*lines[3])
    source, text = lines[4]
    with pytest.raises(DataError, match=r":5: a: empty text"):
        formats.text_field(source, formats.parse_object(source, text), "a")
    with pytest.raises(DataError, match=r"b: missing \(fields present: a\)"):
        formats.text_field(source, {"a": "x"}, "b")
