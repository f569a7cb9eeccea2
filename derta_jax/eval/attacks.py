"""Prompt builders for the evaluation suites: JSONL rows -> items ready for generation.

Why: every suite (direct requests, the paper's CompletionAttack, prefilling at several
depths, ready-made jailbreak files, over-refusal probes, GSM8K/MMLU) needs the question
rendered in the right format, and a mistake there (a prefill that opens a new turn, a chat
template on a completion attack) silently changes what is measured. One item shape:

    {"id", "suite", "question", "prompt", "prefill", "k", "meta"}

`prompt` is the full text given to the model (it ENDS with `prefill` when there is one);
`prefill` is the attacker's text already in the assistant turn (or the completion
opening), "" when none; `k` is the prefill depth (prefill suite only, else None); `meta`
holds the row's other fields plus `source` (FILE:LINE). Ids: the row's string `id` if it
has one, else `SUITE/LINE` (5 digits); prefill items add `/kDEPTH`.

Suites (rows need `question`; other required fields in brackets):
- direct, prompt_file, over_refusal: the question in the training template.
- completion [opening optional]: NO template: `question + joiner + opening` (or the
  question alone, as in the reference's completion-attack file, where the question IS the
  opening; `include_question=False` gives the opening alone). The model continues it.
- prefill [harmful_response]: for each k of `depths` (default 0, 5, 10, 20, 40), the first
  k TOKENS (unit="tokens", re-encoding the response without special tokens; the prefill is
  the exact text prefix covering those tokens) or k whitespace WORDS (unit="words") of the
  response, rendered with `template.render(question, prefill)`, which CONTINUES the
  assistant turn; the prompt always ends with the prefill exactly (whitespace a trimming
  chat template dropped is put back). A k beyond the response uses all of it (meta
  `prefill_units` says how many).
- rank_prefill [harmful_response]: prefilling that feeds, per position, only tokens among
  the model's own top k; it needs the model, so eval/rank_prefill.py builds it.
- gsm8k, mmlu, benign [answer; benign also task]: the question in the template.
Chat-rendered prompts already contain the BOS text: tokenise them without special tokens.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

# Private helpers of the row-format reader, reused so that every JSONL error in the project
# reads the same way (FILE:LINE: field: what).
from derta_jax.data.formats import DataError, decoded_lines, parse_object, text_field
from derta_jax.data.templates import Template

SUITES = ("direct", "completion", "prefill", "rank_prefill", "prompt_file", "over_refusal",
          "gsm8k", "mmlu", "benign")
DEFAULT_PREFILL_DEPTHS = (0, 5, 10, 20, 40)
PREFILL_UNITS = ("tokens", "words")
REQUIRED_FIELDS = {"prefill": ("question", "harmful_response"),
                   "rank_prefill": ("question", "harmful_response"), "gsm8k": ("question", "answer"),
                   "mmlu": ("question", "answer"), "benign": ("question", "task", "answer")}

Row = tuple[str, dict]  # (FILE:LINE, the JSON object)


# Prompt sets the package ships, named `builtin:NAME` wherever a prompt file is taken.
# safe_triggers: 120 safe requests in 8 categories of 15 (homonyms, figurative language, safe
# targets, safe contexts, definitions, historical events, privacy of fictional characters,
# nonsense groups) that hold a trigger word a shallowly tuned model may refuse on (the
# XSTest idea, Röttger et al. 2024; the project's own text): run with --suite=over_refusal.
BUILTIN_PREFIX = "builtin:"
BUILTIN_PROMPTS = {"safe_triggers": "safe_triggers.jsonl"}


def prompt_file_location(path: str) -> str:
    """The file a prompt-file argument names: `builtin:NAME` -> the packaged file; any other
    path as given. ValueError naming the choices for an unknown builtin name."""
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_PROMPTS:
        raise ValueError(f"{path}: no such built-in prompt set; choose from "
                         f"{', '.join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_PROMPTS))}")
    return os.path.join(os.path.dirname(__file__), "prompts", BUILTIN_PROMPTS[name])


def read_prompt_rows(path: str, required: Sequence[str] = ("question",)) -> list[Row]:
    """Rows of a JSONL prompt file (or `builtin:NAME`; sources then read NAME's way, e.g.
    `builtin:safe_triggers:12`); DataError `FILE:LINE: field: ...` for a bad row."""
    rows = []
    location = prompt_file_location(path)
    for source, text in decoded_lines(location):
        source = path + source[len(location):]
        if isinstance(text, DataError):
            raise text
        obj = parse_object(source, text)
        for field in required:
            text_field(source, obj, field)
        if "id" in obj and not (isinstance(obj["id"], str) and obj["id"].strip()):
            raise DataError(source, "id", f"expected a non-empty string, got {obj['id']!r}")
        rows.append((source, obj))
    if not rows:
        raise ValueError(f"{path}: no prompts in the file")
    return rows


def _item(suite: str, source: str, row: dict, prompt: str, prefill: str = "",
          k: int | None = None, extra_meta: dict | None = None) -> dict:
    line = int(source.rsplit(":", 1)[1])
    base = row["id"] if isinstance(row.get("id"), str) else f"{suite}/{line:05d}"
    meta = {key: value for key, value in row.items() if key not in ("id", "question")}
    meta.update(extra_meta or {}, source=source)
    return {"id": base if k is None else f"{base}/k{k}", "suite": suite,
            "question": row["question"], "prompt": prompt, "prefill": prefill, "k": k,
            "meta": meta}


def templated_items(rows: Sequence[Row], template: Template, suite: str) -> list[dict]:
    """direct / prompt_file / over_refusal / gsm8k / mmlu / benign: question in the template."""
    return [_item(suite, source, row, template.render(row["question"])) for source, row in rows]


def completion_items(rows: Sequence[Row], *, joiner: str = "\n",
                     include_question: bool = True) -> list[dict]:
    items = []
    for source, row in rows:
        opening = row.get("opening", "")
        if not isinstance(opening, str):
            raise DataError(source, "opening", f"expected a string, got {opening!r}")
        if not opening:
            prompt = row["question"]
        elif include_question:
            prompt = row["question"] + joiner + opening
        else:
            prompt = opening
        items.append(_item("completion", source, row, prompt, prefill=opening))
    return items


def response_prefix(response: str, k: int, unit: str = "tokens", tokenizer: Any = None) -> tuple[str, int]:
    """(the text prefix of `response` covering its first k units, how many units it holds)."""
    if k < 0:
        raise ValueError(f"prefill depth k={k} must be >= 0")
    if unit not in PREFILL_UNITS:
        raise ValueError(f"prefill unit must be one of {', '.join(PREFILL_UNITS)}, got {unit!r}")
    if k == 0:
        return "", 0
    if unit == "words":
        words = response.split()
        end, position = 0, 0
        for word in words[:k]:
            position = response.index(word, position) + len(word)
            end = position
        return response[:end], min(k, len(words))
    if tokenizer is None:
        raise ValueError("prefill unit 'tokens' needs the model's tokenizer")
    offsets = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    used = min(k, len(offsets))
    return response[:offsets[used - 1][1]] if used else "", used


def _render_prefilled(template: Template, question: str, prefill: str, source: str) -> str:
    """The template's prompt continuing `prefill`, ending with the prefill EXACTLY.

    Chat templates that trim message content (Llama-3's `| trim`) drop a prefill's trailing
    whitespace; it is put back, so that the prompt holds exactly the k units asked for.
    """
    prompt = template.render(question, prefill)
    if prompt.endswith(prefill):
        return prompt
    kept = prefill.rstrip()
    if prompt.endswith(kept):
        return prompt + prefill[len(kept):]
    raise ValueError(f"{source}: the {template.name} template does not end the prompt with the "
                     f"prefill (it changes the assistant text), so the prefill cannot continue "
                     f"the assistant turn; prefill starts {prefill[:40]!r}")


def prefill_items(rows: Sequence[Row], template: Template, *, tokenizer: Any = None,
                  depths: Sequence[int] = DEFAULT_PREFILL_DEPTHS, unit: str = "tokens",
                  response_field: str = "harmful_response") -> list[dict]:
    """One item per (row, k): the first k units of the harmful response in the assistant turn."""
    if not depths:
        raise ValueError("prefill: the list of depths is empty")
    items = []
    for source, row in rows:
        response = text_field(source, row, response_field)
        for k in depths:
            prefill, used = response_prefix(response, k, unit, tokenizer)
            prompt = _render_prefilled(template, row["question"], prefill, source)
            items.append(_item("prefill", source, row, prompt, prefill=prefill, k=k,
                               extra_meta={"prefill_unit": unit, "prefill_units": used}))
    return items


def build_suite(suite: str, path: str, template: Template | None = None, *,
                tokenizer: Any = None, **options) -> list[dict]:
    """Items of `suite` from the JSONL file `path` (options go to the suite's builder)."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}, got {suite!r}")
    rows = read_prompt_rows(path, REQUIRED_FIELDS.get(suite, ("question",)))
    if suite == "completion":
        return completion_items(rows, **options)
    if template is None:
        raise ValueError(f"suite {suite!r} renders the question in a template; pass one "
                         f"(derta_jax.data.templates.make_template)")
    if suite == "prefill":
        return prefill_items(rows, template, tokenizer=tokenizer, **options)
    if suite == "rank_prefill":
        raise ValueError("suite 'rank_prefill' chooses its prefill with the model: build it "
                         "with derta_jax.eval.rank_prefill.rank_prefill_items")
    if options:
        raise ValueError(f"suite {suite!r} takes no options, got {', '.join(sorted(options))}")
    return templated_items(rows, template, suite)
