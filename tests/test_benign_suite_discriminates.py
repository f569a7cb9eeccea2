"""The benign suite can fail (issue 12, item 4), shown on the published tiny study's own
generations (docs/reproduction/tiny/generations.jsonl.gz): every benign answer is checked
again here with today's `synthetic.check_answer`, against the world's answer sentence each
row carries.

The base model must score between 40% and 90%, and the deliberately damaged control
(vanilla tuning at 100x the learning rate, `reproduction.DAMAGED_NAME`) measurably lower:
a check that let word salad, loops or a wrong number pass would lift the damaged model
toward the base and fail here. Training and damaging a model inside CI does not fit its
budget (an undertrained base cannot separate them); these are the study's real answers.
The re-check must also reproduce each published score: a change to check_answer means
re-publishing docs/reproduction/tiny (python -m derta_jax.reproduce, its README).
"""

import gzip
import json
import math
import os

from derta_jax.data import synthetic
from derta_jax.eval import reproduction as rp

GENERATIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "docs", "reproduction", "tiny", "generations.jsonl.gz")


def fisher_one_sided(hits_a: int, n_a: int, hits_b: int, n_b: int) -> float:
    """P(a sample scores >= hits_a | both groups share one rate): Fisher's exact test that
    group a scores higher than group b, from the hypergeometric tail."""
    total_hits, total = hits_a + hits_b, n_a + n_b
    top = min(n_a, total_hits)
    return sum(math.comb(total_hits, k) * math.comb(total - total_hits, n_a - k)
               for k in range(hits_a, top + 1)) / math.comb(total, n_a)


def test_fisher_one_sided_matches_counting_every_split():
    import itertools

    for hits_a, n_a, hits_b, n_b in [(3, 4, 0, 4), (4, 6, 1, 5), (0, 3, 3, 3), (2, 5, 2, 4)]:
        answers = [1] * (hits_a + hits_b) + [0] * (n_a + n_b - hits_a - hits_b)
        splits = list(itertools.combinations(range(len(answers)), n_a))
        extreme = sum(sum(answers[i] for i in split) >= hits_a for split in splits)
        assert math.isclose(fisher_one_sided(hits_a, n_a, hits_b, n_b), extreme / len(splits))


def _benign_scores() -> dict:
    scores: dict = {}
    with gzip.open(GENERATIONS, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["suite"] != "benign":
                continue
            correct = synthetic.check_answer(row["meta"], row["generation"])
            assert correct == row["score"]["correct"], row  # today's check = the published one
            recipe = row["run"]
            scores.setdefault(recipe, []).append(correct)
    return scores


def test_the_benign_suite_separates_the_base_from_a_damaged_model():
    scores = _benign_scores()
    base, damaged = scores[rp.BASE_NAME], scores[rp.DAMAGED_NAME]
    assert len(base) >= 50 and len(damaged) == len(base)
    assert 0.4 <= sum(base) / len(base) <= 0.9, sum(base) / len(base)
    p_value = fisher_one_sided(sum(base), len(base), sum(damaged), len(damaged))
    assert sum(damaged) < sum(base) and p_value < 0.01, (sum(base), sum(damaged), p_value)
