"""The run summary's metrics: a mean over the run's tail, not the last (noisy) log."""

import math

import pytest

from derta_jax.train.metrics import tail_mean


def _history(steps, loss):
    return [{"step": s, "epoch": s / 10, "loss": loss(s)} for s in steps]


def test_tail_is_the_last_tenth_of_the_steps_when_that_has_enough_logs():
    history = _history(range(1, 101), lambda s: float(s))
    tail = tail_mean(history)
    assert (tail["first_step"], tail["last_step"], tail["logs"]) == (91, 100, 10)
    assert tail["metrics"]["loss"] == pytest.approx(sum(range(91, 101)) / 10)
    assert "step" not in tail["metrics"] and "epoch" not in tail["metrics"]


def test_tail_has_at_least_min_logs_logs():
    history = _history(range(5, 101, 5), lambda s: float(s))  # only 95 and 100 in the last 10%
    tail = tail_mean(history, fraction=0.1, min_logs=5)
    assert (tail["first_step"], tail["logs"]) == (80, 5)
    assert tail["metrics"]["loss"] == pytest.approx(90.0)
    assert tail_mean(history[:3], min_logs=5)["logs"] == 3  # fewer logs than min: all of them


def test_tail_skips_non_finite_values_and_missing_keys():
    history = _history(range(1, 6), lambda s: float(s))
    history[0]["tokens_per_sec"] = math.nan
    history[2]["tokens_per_sec"] = 30.0
    history[4]["loss"] = math.inf
    tail = tail_mean(history)
    assert tail["metrics"]["tokens_per_sec"] == 30.0
    assert tail["metrics"]["loss"] == pytest.approx(2.5)
    assert tail_mean([]) == {}


def test_progress_line_shows_a_dash_for_a_loss_without_positions(tmp_path, capsys):
    """A logging window without RTO rows has rto_loss = 0/0: the line says "-", not "nan"."""
    from derta_jax.train.metrics import MetricLogger

    logger = MetricLogger(str(tmp_path), total_steps=4)
    logger._print({"step": 2, "epoch": 0.5, "loss": 1.25, "mle_loss": 1.25,
                   "rto_loss": float("nan"), "lr": 1e-3})
    line = capsys.readouterr().err
    assert "mle 1.2500" in line and "rto -" in line and "nan" not in line
