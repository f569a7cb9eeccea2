"""Prompt formats: turn (question, response, optional prefill) into prompt and response text.

The one idea: a template returns two strings whose concatenation is exactly the training
text, and the loss is taken on the second one. tokenize.py masks by the character offset
where the response starts, so a template never has to care how its boundary tokenises.

    template.render(question, prefill="")          -> prompt text (what the model is given)
    template.respond(question, response, prefill="") -> response text that follows it,
                                                      ended by the model's end marker
    make_example(template, question, response, prefill="", rto=False, kind=..., source=...)

A `prefill` is the start of the assistant's answer already in the prompt: the harmful
prefix r̂_<k of DeRTa's MLE rows, or a completion attack. It CONTINUES the assistant
turn; it never opens a new one. Formats:

- `reference`: the reference code's literal `[INST] {q} [\\INST]` (its backslash kept for
  reproduction); a prefill follows after a space; the response is a space, the text and
  the tokenizer's EOS. With no prefill there is one space, not the reference's two.
- `chat`: the tokenizer's own `apply_chat_template`; the prompt is the generation prompt
  (or the conversation cut after the prefill, `continue_final_message=True`), and the
  response is whatever the template renders after it for the finished conversation, up
  to and including the end of turn (whitespace after a final EOS is dropped, so that
  every row ends with its EOS, as the RTO span |r̂|+1 of the Batch contract assumes).
- `plain`: `prefix + question + suffix`, then the response and the EOS; for base models.

`terminate_response` puts exactly one EOS at the end of a reference-format `text` whether
or not the file already carries a literal EOS string (the reference's files end every
`text` with `<|end_of_text|>`, Llama-3's EOS, also when another tokenizer is used).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from derta_jax.data.formats import ReferenceRow

REFERENCE_EOS = "<|end_of_text|>"  # the literal the reference code appends to every text
TEMPLATE_NAMES = ("reference", "chat", "plain")


@dataclasses.dataclass(frozen=True)
class Example:
    """One training example as text: loss on `response`, never on `prompt`."""
    prompt: str
    response: str
    rto: bool  # True: every response position is trained to predict the refusal token
    source: str  # the input row it came from, "path:line" (a triple's RTO and prefix rows share it)
    kind: str = "mle"  # helpful | refusal | harmful_prefix | rto | mle (reference rows)


@dataclasses.dataclass(frozen=True)
class TextRow:
    """One training row before any template: what a data set stores (TFDS, Parquet), so the
    same data trains any model. `prompt` set: an already-rendered prompt (a reference-format
    row), used as written; else the template renders `question` (+ `prefill`)."""
    question: str
    response: str
    prefill: str = ""
    rto: bool = False
    kind: str = "mle"
    source: str = ""
    prompt: str = ""


def reference_text_row(row: ReferenceRow) -> TextRow:
    return TextRow(question="", response=row.text, rto=row.safe,
                   kind="rto" if row.safe else "mle", source=row.source, prompt=row.prefix)


def render_row(row: TextRow, template: "Template", eos: str) -> Example:
    """The Example a TextRow trains as under `template` (`eos`: the tokenizer's EOS, which
    ends a pre-rendered row's response exactly once)."""
    if row.prompt:
        return Example(prompt=row.prompt, response=terminate_response(row.response, eos),
                       rto=row.rto, source=row.source, kind=row.kind)
    return make_example(template, row.question, row.response, prefill=row.prefill, rto=row.rto,
                        kind=row.kind, source=row.source)


class Template(Protocol):
    name: str

    def render(self, question: str, prefill: str = "") -> str: ...

    def respond(self, question: str, response: str, prefill: str = "") -> str: ...


def make_example(template: Template, question: str, response: str, *, prefill: str = "",
                 rto: bool = False, kind: str = "mle", source: str = "") -> Example:
    return Example(prompt=template.render(question, prefill),
                   response=template.respond(question, response, prefill),
                   rto=rto, source=source, kind=kind)


def terminate_response(text: str, eos: str) -> str:
    """`text` ending in exactly one `eos`: kept if present, a reference EOS literal swapped."""
    body = text.rstrip()
    if body.endswith(eos):
        return text
    if body.endswith(REFERENCE_EOS):
        return body[: -len(REFERENCE_EOS)] + eos
    return text + eos


def _eos_of(tokenizer: Any) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no "
                         f"eos_token; the response needs an end marker")
    return eos


@dataclasses.dataclass(frozen=True)
class ReferenceTemplate:
    """`[INST] {q} [\\INST]` + (` ` + prefill) | ` ` + response + EOS."""
    eos: str = REFERENCE_EOS
    name: str = "reference"

    def render(self, question: str, prefill: str = "") -> str:
        prompt = f"[INST] {question} [\\INST]"
        return f"{prompt} {prefill}" if prefill else prompt

    def respond(self, question: str, response: str, prefill: str = "") -> str:
        del question, prefill
        return " " + terminate_response(response, self.eos)


@dataclasses.dataclass(frozen=True)
class PlainTemplate:
    """`prefix + q + suffix` + prefill | (` ` after a prefill) + response + EOS."""
    eos: str
    prefix: str = ""
    suffix: str = "\n"
    name: str = "plain"

    def render(self, question: str, prefill: str = "") -> str:
        return f"{self.prefix}{question}{self.suffix}{prefill}"

    def respond(self, question: str, response: str, prefill: str = "") -> str:
        del question
        return (" " if prefill else "") + terminate_response(response, self.eos)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's chat template; a prefill continues the assistant turn."""
    tokenizer: Any
    system: str | None = None
    name: str = "chat"

    def __post_init__(self):
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer {getattr(self.tokenizer, 'name_or_path', '?')!r} has no chat "
                f"template; use --template=reference or --template=plain")

    def _messages(self, question: str, answer: str | None) -> list[dict]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": question})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return messages

    def render(self, question: str, prefill: str = "") -> str:
        if not prefill:
            return self.tokenizer.apply_chat_template(
                self._messages(question, None), tokenize=False, add_generation_prompt=True)
        return self.tokenizer.apply_chat_template(
            self._messages(question, prefill), tokenize=False, continue_final_message=True)

    def respond(self, question: str, response: str, prefill: str = "") -> str:
        prompt = self.render(question, prefill)
        answer = f"{prefill} {response}" if prefill else response
        full = self.tokenizer.apply_chat_template(self._messages(question, answer), tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(
                f"chat template of {getattr(self.tokenizer, 'name_or_path', '?')!r} does not "
                f"render the finished conversation as prompt + response (the prompt is not a "
                f"prefix of it), so the response cannot be separated from the prompt; "
                f"question starts {question[:40]!r}")
        return _end_at_eos(full[len(prompt):], getattr(self.tokenizer, "eos_token", None))


def _end_at_eos(response: str, eos: str | None) -> str:
    """Drops whitespace a template renders after its final EOS (ChatML's "\\n"), so every row
    ends with EOS: no position is trained on what follows the end of the turn."""
    body = response.rstrip()
    return body if eos and body.endswith(eos) else response


def make_template(name: str, tokenizer: Any = None, *, plain_prefix: str = "", plain_suffix: str = "\n",
                  system: str | None = None) -> Template:
    """`reference` works without a tokenizer (EOS = the reference's literal); the others need one."""
    if name == "reference":
        return ReferenceTemplate(eos=_eos_of(tokenizer) if tokenizer is not None else REFERENCE_EOS)
    if name in ("chat", "plain") and tokenizer is None:
        raise ValueError(f"template {name!r} needs a tokenizer (--tokenizer=DIR)")
    if name == "chat":
        return ChatTemplate(tokenizer, system=system)
    if name == "plain":
        return PlainTemplate(eos=_eos_of(tokenizer), prefix=plain_prefix, suffix=plain_suffix)
    raise ValueError(f"template must be one of {', '.join(TEMPLATE_NAMES)}, got {name!r}")


def template_identity(template: Template) -> str:
    """Everything about a template that changes its text (the tokenizer's chat template is
    part of the tokenizer's own fingerprint), e.g. `plain(prefix='Q: ', suffix='\\n')`."""
    settings = {f.name: getattr(template, f.name) for f in dataclasses.fields(template)
                if f.name not in ("name", "tokenizer")}
    return f"{template.name}({', '.join(f'{k}={v!r}' for k, v in sorted(settings.items()))})"


def example_from_reference_row(row: ReferenceRow, eos: str) -> Example:
    """A reference-format row as an Example: `prefix` is the prompt, `text` (with one EOS) the response."""
    return Example(prompt=row.prefix, response=terminate_response(row.text, eos), rto=row.safe,
                   source=row.source, kind="rto" if row.safe else "mle")
