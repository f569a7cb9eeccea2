"""Degeneracy statistics against slow, obviously-correct references on random word strings;
the rules on hand-written loops and on every text of a small synthetic world."""

from __future__ import annotations

import random

import pytest

from derta_jax.data.synthetic import generate_world, world_texts
from derta_jax.eval import degeneracy as dg


def _random_tokens(rng: random.Random) -> list[str]:
    """Short strings over a tiny alphabet, so that loops and repeats happen often."""
    alphabet = "abc"[:rng.randint(1, 3)]
    return [rng.choice(alphabet) for _ in range(rng.randint(0, 14))]


def _slow_loop_mask(tokens, min_copies, max_period):
    """A position is in a loop if some window tokens[s:e] with e - s >= min_copies * p has
    period p (every token equals the one p before it) for some p <= max_period."""
    n = len(tokens)
    mask = [False] * n
    for p in range(1, max_period + 1):
        for s in range(n):
            for e in range(s + min_copies * p, n + 1):
                if all(tokens[j] == tokens[j - p] for j in range(s + p, e)):
                    for j in range(s, e):
                        mask[j] = True
    return mask


def _slow_repeat_mask(tokens, n):
    """A position is covered if it lies in an n-gram that also starts somewhere else."""
    starts = range(len(tokens) - n + 1)
    mask = [False] * len(tokens)
    for a in starts:
        if any(b != a and tokens[b:b + n] == tokens[a:a + n] for b in starts):
            for j in range(a, a + n):
                mask[j] = True
    return mask


@pytest.mark.parametrize("min_copies, max_period", [(3, 50), (2, 50), (3, 2), (4, 1)])
def test_loop_spans_match_the_definition_on_random_strings(min_copies, max_period):
    rng = random.Random(f"loops/{min_copies}/{max_period}")
    for _ in range(400):
        tokens = _random_tokens(rng)
        mask = _slow_loop_mask(tokens, min_copies, max_period)
        spans = dg.loop_spans(tokens, min_copies, max_period)
        got = [any(s <= j < e for s, e in spans) for j in range(len(tokens))]
        assert got == mask, tokens
        # merged, sorted, non-touching spans
        assert all(e1 < s2 for (_, e1), (s2, _) in zip(spans, spans[1:])), spans
        expected = sum(mask) / len(tokens) if tokens else 0.0
        assert dg.loop_coverage(tokens, min_copies, max_period) == pytest.approx(expected)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_repeated_ngram_coverage_matches_the_definition_on_random_strings(n):
    rng = random.Random(f"repeats/{n}")
    for _ in range(400):
        tokens = _random_tokens(rng)
        mask = _slow_repeat_mask(tokens, n)
        expected = sum(mask) / len(tokens) if tokens else 0.0
        assert dg.repeated_ngram_coverage(tokens, n) == pytest.approx(expected), tokens
        assert dg.distinct_ratio(tokens) == (len(set(tokens)) / len(tokens) if tokens else 1.0)


def test_words_split_glued_keywords_and_keep_numbers_whole():
    text = "SorrySorry,intoSorry people's 1.00 ± 3,000 DeRTa"
    words = dg.words_of(text)
    assert [w.text for w in words] == ["sorry", "sorry", "into", "sorry", "people", "s",
                                       "1.00", "3,000", "de", "rta"]
    assert all(text[w.start:w.end].lower() == w.text for w in words)


@pytest.mark.parametrize("text, rules", [
    # one word: a loop, a collapsed vocabulary (1 distinct in 40) and 200 bytes zlib shrinks
    ("Find " * 40, ("loop", "collapsed", "compresses")),
    ("Find Find Find", ("loop",)),
    ("SorrySorrySorrySorrySorrySorry", ("loop",)),
    ("but I cannot, but I cannot, but I cannot", ("loop",)),
    # a whole sentence three times is a loop of period 7
    ("Take the ring and run away. " * 3, ("loop",)),
    # a handful of words cycled without a strict period: 3 distinct words in 13 (< 1/4),
    # and every word sits in a 3-gram said twice
    ("ink the ink ink a ink the ink ink a the ink ink", ("collapsed",)),
    # no words at all, only repeated bytes
    ("!" * 300, ("compresses",)),
    # two copies are emphasis, not a loop
    ("no, no. I cannot help with that.", ()),
    ("Sorry Sorry", ()),
    ("", ()),
])
def test_rules_on_hand_written_texts(text, rules):
    stats = dg.text_stats(text)
    assert stats.rules == rules, stats.describe()
    assert dg.is_degenerate(text) is bool(rules)


def test_loop_char_spans_point_at_the_loop():
    text = "Step 1: hide it. around around around aroundSorry."
    spans = dg.loop_char_spans(text)
    assert [text[s:e] for s, e in spans] == ["around around around around"]


def test_no_text_of_a_world_is_degenerate():
    """Questions, harmful answers, refusals and benign answers of both styles: ordinary
    language must never read as a loop (the calibration the thresholds rest on)."""
    for style in ("tiny", "plain_english"):
        world = generate_world(3, style=style, num_triples=20, num_helpful=40, num_pretrain=120,
                               num_eval_harmful=2, num_eval_benign=10, num_over_refusal=4)
        for text in set(world_texts(world)):
            assert not dg.is_degenerate(text), (style, text, dg.text_stats(text).describe())


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="min_copies=1 must be >= 2"):
        dg.loop_spans(["a"], min_copies=1)
    with pytest.raises(ValueError, match="n=0 must be >= 1"):
        dg.repeated_ngram_coverage(["a"], 0)
