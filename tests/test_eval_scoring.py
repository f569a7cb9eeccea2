"""GSM8K / MMLU answer extraction on tricky strings, and Wilson intervals against a slow
reference (inverting the score test by bisection)."""

from __future__ import annotations

import math

import pytest

from derta_jax.eval.scoring import (Rate, gsm8k_correct, gsm8k_flexible, gsm8k_gold,
                                    gsm8k_strict, mmlu_correct, mmlu_gold, mmlu_letter,
                                    normalise_number, rate_of, score_item, wilson_interval)


@pytest.mark.parametrize("text, strict, flexible", [
    ("She pays 3 * 4 = 12 dollars.\n#### 12", "12", "12"),
    ("#### -7", "-7", "-7"),  # negative
    ("The loss is -7 degrees.", None, "-7"),
    ("So the total is 3.5.", None, "3.5"),  # decimal, trailing period
    ("#### 1,234,567", "1234567", "1234567"),  # thousands separators
    ("It costs $1,200.50 in total.", None, "1200.5"),
    ("#### $5", None, "5"),  # strict is "#### (-?[0-9.,]+)": no "$"
    ("first 10, then 20, finally 30 apples", None, "30"),  # several numbers: the last
    ("#### 8\nbut some say 9", "8", "9"),  # strict takes the marker, flexible the last
    ("no number here", None, None),
    ("#### 72.00", "72", "72"),
    ("#### 1.2.3", None, "1.2"),  # strict: "1.2.3" is no number; flexible: "1.2", then ".3" is glued to it
    ("pages 2-3", None, "3"),  # a hyphen, not a minus
    ("version x2", None, None),  # a digit glued to a letter is not a number
    ("#### 5\n#### 6", "5", "6"),  # strict: the first marker
])
def test_gsm8k_extraction(text, strict, flexible):
    assert gsm8k_strict(text) == strict
    assert gsm8k_flexible(text) == flexible


def test_gsm8k_normalisation_and_comparison():
    assert normalise_number("1,000.") == normalise_number("$1000") == normalise_number("1000.00") == "1000"
    assert normalise_number("-0.50") == "-0.5"
    assert normalise_number(".") is None and normalise_number("1.2.3") is None
    gold = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert gsm8k_gold(gold) == "72" and gsm8k_gold("72") == "72"
    assert gsm8k_correct("She sold 72.00 clips altogether.", gold)
    assert gsm8k_correct("She sold 72 clips.\n#### 72", gold, mode="strict")
    assert not gsm8k_correct("She sold 72 clips.", gold, mode="strict")
    assert not gsm8k_correct("72 clips, or maybe 73", gold)
    with pytest.raises(ValueError, match="gsm8k: answer field has no number"):
        gsm8k_gold("#### many")
    with pytest.raises(ValueError, match="gsm8k mode must be 'strict' or 'flexible', got 'loose'"):
        gsm8k_correct("1", "1", mode="loose")


@pytest.mark.parametrize("text, letter", [
    ("The answer is (B)", "B"),
    ("The answer is (B). Earlier I thought (A).", "B"),
    ("B.", "B"),
    ("**B**", "B"),
    ("Answer: b", "B"),  # lower-case letter in an explicit answer
    ("(c)", "C"),
    ("d", "D"),
    ("B. Paris is the capital.", "B"),
    ("C) 12", "C"),
    ("I think the correct option is D because it is larger.", "D"),
    ("answer is A. Actually, the final answer is C.", "C"),  # last explicit statement
    ("Paris is the capital, so (B) is right.", "B"),  # one marked letter anywhere
    ("Because it is big.", None),  # a letter inside a word never counts
    ("A good choice would be the second one.", None),  # a bare article is not an answer
    ("the answer is a bit tricky", None),  # lower-case "a" running on is not a letter
    ("Either (A) or (B), hard to say", None),  # two marked letters: ambiguous
    ("(A) or (B), hard to say", "A"),  # ... unless the response starts with one (rule 3)
    ("E.", None),  # only A-D
    ("", None),
])
def test_mmlu_letter(text, letter):
    assert mmlu_letter(text) == letter


def test_mmlu_gold_and_correct():
    assert mmlu_correct("The answer is (c).", "C")
    assert not mmlu_correct("The answer is (B).", "C")
    with pytest.raises(ValueError, match="mmlu: answer field must be one letter A-D, got 'AB'"):
        mmlu_gold("AB")


def _wilson_by_bisection(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The interval {p : |k/n - p| <= z sqrt(p(1-p)/n)}, its ends found by bisection."""
    phat = k / n

    def inside(p):
        return abs(phat - p) <= z * math.sqrt(p * (1 - p) / n)

    def edge(outside, inner):
        for _ in range(200):
            middle = (outside + inner) / 2
            if inside(middle):
                inner = middle
            else:
                outside = middle
        return inner

    low = 0.0 if inside(0.0) or k == 0 else edge(0.0, phat)
    high = 1.0 if inside(1.0) or k == n else edge(1.0, phat)
    return low, high


@pytest.mark.parametrize("k, n", [(0, 1), (0, 20), (1, 20), (7, 20), (20, 20), (3, 7), (250, 500)])
def test_wilson_interval_matches_score_test_inversion(k, n):
    low, high = wilson_interval(k, n)
    ref_low, ref_high = _wilson_by_bisection(k, n)
    assert low == pytest.approx(ref_low, abs=1e-9)
    assert high == pytest.approx(ref_high, abs=1e-9)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_rates():
    rate = rate_of([True, False, None, True])
    assert (rate.k, rate.n, rate.value) == (2, 3, 2 / 3)
    assert rate.to_json()["ci95_low"] == pytest.approx(wilson_interval(2, 3)[0])
    assert Rate(0, 0).to_json() == {"k": 0, "n": 0, "value": None, "ci95_low": None, "ci95_high": None}
    with pytest.raises(ValueError, match="need integers 0 <= k <= n, got k=3, n=2"):
        Rate(3, 2)
    with pytest.raises(ValueError, match="wilson_interval: need 0 <= k <= n and n > 0, got k=0, n=0"):
        wilson_interval(0, 0)


def test_score_item_by_suite():
    gsm = {"suite": "gsm8k", "meta": {"answer": "#### 1,000"}}
    assert score_item(gsm, "It is 1000.") == {"correct": True, "correct_strict": False}
    assert score_item({"suite": "mmlu", "meta": {"answer": "A"}}, "(A)") == {"correct": True}
    benign = {"suite": "benign", "meta": {"task": "add", "answer": "3 plus 4 is 7."}}
    assert score_item(benign, "3 plus 4 is 7.") == {"correct": True}
    assert score_item(benign, "3 plus 4 is 8.") == {"correct": False}
    assert score_item({"suite": "direct", "meta": {}}, "anything") == {}


@pytest.mark.parametrize("n", [1, 16, 27, 38, 40, 60, 300, 2520])
def test_wilson_interval_is_exactly_clamped_at_k0_and_kn(n):
    # Unclamped, the formula gives -6.9e-18 at k=0 for n=27, 38, 40 and 1.0000000000000002
    # at k=n for n=16, 40: outside [0, 1], which broke matplotlib's error bars.
    low, high = wilson_interval(0, n)
    assert low == 0.0 and 0.0 < high < 1.0
    low, high = wilson_interval(n, n)
    assert high == 1.0 and 0.0 < low < 1.0
    # a value's error bar lengths are never negative
    for k in (0, n):
        low, high = wilson_interval(k, n)
        assert k / n - low >= 0.0 and high - k / n >= 0.0
