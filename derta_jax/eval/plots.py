"""PNG plots of evaluation reports (matplotlib, Agg backend, no display needed).

Why separate from report.py: plotting is the only part that needs matplotlib, and these
figures are the ones the paper's argument rests on:
- ASR against prefill depth k, one curve per model (Qi et al. 2024's "shallow alignment"
  plot; DeRTa should stay low as k grows);
- where refusals start (the paper's Figure 4): a histogram of token positions of the first
  refusal phrase, one bar group per model;
- and the mean P(refusal token) along harmful answers (refusal_probability.py).
Files are deterministic: no date or software version in the PNG metadata, fixed figure
size and DPI, models drawn in sorted order.
"""

from __future__ import annotations

import math
from typing import Mapping

_PNG_METADATA = {"Software": None}  # matplotlib writes its version there by default
_FIGSIZE = (6.0, 4.0)
_DPI = 100


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_LINESTYLES = ("-", "--", "-.", ":")


def _centre(cell: Mapping) -> float:
    """A rate's value, or a seed cell's mean (derta_jax.eval.reproduction.seed_cell)."""
    return cell["mean"] if "mean" in cell else cell["value"]


def plot_prefill_curves(reports: Mapping[str, Mapping], path: str,
                        metric: str = "asr_not_refused", held_out: bool | None = None,
                        title: str = "", suite: str = "prefill",
                        xlabel: str = "prefill depth k") -> None:
    """ASR (`metric` of the prefill groups) against k, one line per model, with 95% CIs.

    `reports`: name -> a report (derta_jax.eval.report.summarise: rates with Wilson
    intervals) or a seed report (derta_jax.eval.reproduction.seed_report: means over seeds
    with t intervals; a cell of one seed has no interval and gets no error bar). Groups with
    this `held_out` (None: all categories pooled; True: held-out categories only).

    Models with equal values (e.g. several at ASR 0 at every depth) would hide each other:
    each line is shifted sideways by a small fraction of the k spacing and gets its own
    marker and line style, so every model stays visible; the x ticks are the true k."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=_FIGSIZE, dpi=_DPI)
    curves = {}
    for name in sorted(reports):
        groups = sorted((g for g in reports[name]["groups"] if g["suite"] == suite
                         and g["held_out"] is held_out and g.get(metric) is not None),
                        key=lambda g: g["k"])
        if groups:
            curves[name] = groups
    all_ks = sorted({g["k"] for groups in curves.values() for g in groups})
    gaps = [b - a for a, b in zip(all_ks, all_ks[1:])]
    dodge = 0.25 * min(gaps) / max(len(curves), 1) if gaps else 0.0
    for index, (name, groups) in enumerate(curves.items()):
        shift = (index - (len(curves) - 1) / 2) * dodge
        ks = [g["k"] + shift for g in groups]
        values = [_centre(g[metric]) for g in groups]
        low = [0.0 if g[metric]["ci95_low"] is None else v - g[metric]["ci95_low"]
               for v, g in zip(values, groups)]
        high = [0.0 if g[metric]["ci95_high"] is None else g[metric]["ci95_high"] - v
                for v, g in zip(values, groups)]
        ax.errorbar(ks, values, yerr=[low, high], marker=_MARKERS[index % len(_MARKERS)],
                    linestyle=_LINESTYLES[index % len(_LINESTYLES)], capsize=3, label=name)
    if all_ks:
        ax.set_xticks(all_ks)
    ax.set_xlabel(xlabel)
    ax.set_ylabel({"refusal_rate": "refused share", "accuracy": "accuracy"}.get(
            metric, "ASR (" + metric.removeprefix("asr_").replace("_", " ") + ")"))
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or ("Attack success rate against rank-assisted prefill depth"
                           if suite == "rank_prefill" else
                           "Attack success rate against prefill depth"))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=_PNG_METADATA)
    plt.close(fig)


def plot_position_histograms(reports: Mapping[str, Mapping], path: str) -> None:
    """Share of refusals starting in each position bin, one bar group per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=_FIGSIZE, dpi=_DPI)
    names = sorted(reports)
    width = 0.8 / max(len(names), 1)
    labels: list[str] = []
    unit = "token"
    for index, name in enumerate(names):
        positions = reports[name]["refusal_positions"]
        histogram = positions["absolute"]
        unit = positions["unit"] if isinstance(positions["unit"], str) else "position"
        edges = [math.inf if e == "inf" else e for e in histogram["edges"]]
        labels = [f"{int(lo)}-{int(hi) - 1}" if math.isfinite(hi) else f">={int(lo)}"
                  for lo, hi in zip(edges[:-1], edges[1:])]
        total = sum(histogram["counts"])
        shares = [c / total if total else 0.0 for c in histogram["counts"]]
        ax.bar([i + (index - (len(names) - 1) / 2) * width for i in range(len(shares))],
               shares, width=width, label=f"{name} (n={total})")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_xlabel(f"{unit} position where the refusal starts")
    ax.set_ylabel("share of refusals")
    ax.set_title("Where refusals start")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=_PNG_METADATA)
    plt.close(fig)


def plot_refusal_curves(curves: Mapping[str, Mapping], path: str,
                        xlabel: str = "relative position in the harmful answer") -> None:
    """Mean P(refusal token) along harmful answers, one line per model.

    `curves`: name -> {"x": [...], "mean": [...]} (refusal_position.Curve.to_json()).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=_FIGSIZE, dpi=_DPI)
    for name in sorted(curves):
        ax.plot(curves[name]["x"], curves[name]["mean"], marker=".", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("P(refusal token)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Probability of refusing along harmful answers")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=_PNG_METADATA)
    plt.close(fig)
