"""Helpfulness answer extraction (GSM8K, MMLU) and rates with 95% confidence intervals.

Why: DeRTa must keep helpfulness (the paper: GSM8K, MMLU within a point of vanilla); the
number is only comparable to published ones if answers are extracted the standard way,
and a difference between recipes only means something next to its confidence interval.

GSM8K
- strict: the first "#### (-?[0-9.,]+)" (the dataset's own answer marker).
- flexible: the LAST number in the text: optional "-" and "$", digits with optional
  ","-grouped thousands and a decimal part. A minus sign glued to a preceding letter or
  digit is a hyphen ("2-3" gives 3, "COVID-19" gives 19) and a digit glued to a preceding
  letter is not a number ("x2").
- normalisation (both): drop "$" and ",", drop a trailing "."; answers are compared as
  decimals, so "1,000", "1000.", "$1000" and "1000.00" are all 1000. A string that is not a
  number after normalisation ("1.2.3", ".") extracts nothing.
- the gold answer is the strict extraction of the dataset's `answer` field (or the field
  itself when it has no "####").

MMLU letter extraction, first rule that matches wins:
1. an explicit statement, the LAST one in the text: "answer is (B)", "answer: b",
   "Answer is **C**", "the correct option is D" (the words answer/option/choice, any case;
   the letter A-D in either case, optionally in ( ) or ** **);
2. the whole response is a letter: "B", "(b)", "B.", "**B**", "B)";
3. the response STARTS with a marked letter: "B. Paris", "(C) 12", "**D** because", "B) x",
   "B: x";
4. exactly one distinct marked capital letter anywhere: "(B)" or "**B**".
A letter inside a word never counts ("Because", "Bob"), nor does a bare capital word such as
"A" in "A good choice is ..." (rule 3 needs a mark after it).

Rates: `Rate(k, n)` carries the share and its Wilson score interval (95%, z = 1.959964),
which stays inside [0, 1] and behaves at k = 0 or k = n, unlike the normal approximation.
"""

from __future__ import annotations

import dataclasses
import math
import re
from decimal import Decimal, InvalidOperation

Z_95 = 1.959963984540054
MMLU_LETTERS = "ABCD"

_STRICT = re.compile(r"#### (-?[0-9.,]+)")
_NUMBER = re.compile(r"(?<![\w.])-?\$?\d+(?:,\d{3})*(?:\.\d+)?")
# A bare capital letter must not run into a word; a bare lower-case one must end the text
# or be followed by punctuation ("the answer is a bit tricky" names no letter).
_BARE = r"([A-D])(?![A-Za-z])|([a-d])(?=\s*$|[.),;:!*\n])"
_EXPLICIT = re.compile(rf"\b(?i:answer|option|choice)\b(?:\s+(?i:is))?\s*[:=]?\s*"
                       rf"(?:\(([A-Da-d])\)|\*\*([A-Da-d])\*\*|{_BARE})")
_WHOLE = re.compile(r"^\s*(?:\(([A-Da-d])\)|\*\*([A-Da-d])\*\*|([A-Da-d]))\s*[.):]?\s*$")
_LEADING = re.compile(r"^\s*(?:\(([A-Da-d])\)|\*\*([A-Da-d])\*\*|([A-Da-d])[.):])(?![A-Za-z])")
_MARKED = re.compile(r"\(([A-D])\)|\*\*([A-D])\*\*")


def normalise_number(text: str) -> str | None:
    """Canonical decimal string of a GSM8K answer, or None if it is not a number."""
    cleaned = text.strip().replace("$", "").replace(",", "")
    if cleaned.endswith("."):
        cleaned = cleaned[:-1]
    if not re.fullmatch(r"-?\d+(?:\.\d+)?", cleaned):
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:  # pragma: no cover - the pattern above already excludes this
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def gsm8k_strict(text: str) -> str | None:
    match = _STRICT.search(text)
    return None if match is None else normalise_number(match.group(1))


def gsm8k_flexible(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return None if not numbers else normalise_number(numbers[-1])


def gsm8k_gold(answer_field: str) -> str:
    """The reference answer of a GSM8K row (its "#### n" line, or the field itself)."""
    value = gsm8k_strict(answer_field) if "####" in answer_field else normalise_number(answer_field)
    if value is None:
        raise ValueError(f"gsm8k: answer field has no number: {answer_field[-60:]!r}")
    return value


def gsm8k_correct(generation: str, answer_field: str, mode: str = "flexible") -> bool:
    if mode not in ("strict", "flexible"):
        raise ValueError(f"gsm8k mode must be 'strict' or 'flexible', got {mode!r}")
    extracted = gsm8k_strict(generation) if mode == "strict" else gsm8k_flexible(generation)
    return extracted is not None and extracted == gsm8k_gold(answer_field)


def _letter(match: re.Match) -> str:
    return next(g for g in match.groups() if g).upper()


def mmlu_letter(text: str) -> str | None:
    """A-D from a response (precedence in the module docstring), or None."""
    explicit = list(_EXPLICIT.finditer(text))
    if explicit:
        return _letter(explicit[-1])
    for pattern in (_WHOLE, _LEADING):
        match = pattern.match(text)
        if match:
            return _letter(match)
    marked = {_letter(m) for m in _MARKED.finditer(text)}
    return marked.pop() if len(marked) == 1 else None


def mmlu_gold(answer_field: str) -> str:
    letter = answer_field.strip().upper()
    if len(letter) != 1 or letter not in MMLU_LETTERS:
        raise ValueError(f"mmlu: answer field must be one letter A-D, got {answer_field!r}")
    return letter


def mmlu_correct(generation: str, answer_field: str) -> bool:
    return mmlu_letter(generation) == mmlu_gold(answer_field)


@dataclasses.dataclass(frozen=True)
class Rate:
    k: int
    n: int

    def __post_init__(self):
        if not (isinstance(self.k, int) and isinstance(self.n, int) and 0 <= self.k <= self.n):
            raise ValueError(f"Rate: need integers 0 <= k <= n, got k={self.k!r}, n={self.n!r}")

    @property
    def value(self) -> float | None:
        return self.k / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson_interval(self.k, self.n) if self.n else None

    def to_json(self) -> dict:
        low, high = self.interval or (None, None)
        return {"k": self.k, "n": self.n, "value": self.value, "ci95_low": low, "ci95_high": high}


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n, inside [0, 1].

    Exactly 0 at k = 0 and exactly 1 at k = n (the formula's values there): in floating
    point it gives -6.9e-18 (k=0, n=27) or 0.9999999999999999 (k=n), so an interval would
    miss its own value and plotted error bars get negative lengths.
    """
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if k == 0 else min(p, max(0.0, centre - half))
    high = 1.0 if k == n else max(p, min(1.0, centre + half))
    return low, high


def rate_of(flags) -> Rate:
    """Rate of True among booleans (None entries are not counted)."""
    values = [bool(f) for f in flags if f is not None]
    return Rate(sum(values), len(values))


def score_item(item: dict, generation: str) -> dict:
    """Correctness of a helpfulness item's generation: {} for suites without an answer.

    gsm8k: `correct` (flexible) and `correct_strict`; mmlu: `correct`; items carrying a
    synthetic-world `task` (benign tasks, over-refusal how-tos): `correct` by the world's
    own checker (derta_jax.data.synthetic.check_answer).
    """
    meta = item.get("meta", {})
    if item["suite"] == "gsm8k":
        return {"correct": gsm8k_correct(generation, meta["answer"], "flexible"),
                "correct_strict": gsm8k_correct(generation, meta["answer"], "strict")}
    if item["suite"] == "mmlu":
        return {"correct": mmlu_correct(generation, meta["answer"])}
    if "task" in meta and "answer" in meta:
        from derta_jax.data.synthetic import check_answer
        return {"correct": check_answer(meta, generation)}
    return {}
