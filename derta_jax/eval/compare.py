"""Combine several evaluation reports into one table and one set of plots.

    python -m derta_jax.eval.compare --report=vanilla=OUT_V --report=derta=OUT_D --out=DIR
                                     [--overwrite]

Why: the paper's claims are comparisons (vanilla vs +prefix vs +RTO vs DeRTa): the ASR
against prefill depth needs one curve per model on the same axes, and the refusal-position
histogram one bar group per model. Each OUT is a directory written by
`python -m derta_jax.evaluate` (its report.json is read); names must be unique.

Seeds: `seed_summary` combines the reports of one recipe trained with several seeds into
mean, sample standard deviation and a 95% t interval over seeds per table row (the spread
between seeds is large at small scale, so a single seed's ASR means little; why t over
seeds and not a Wilson interval on pooled counts: derta_jax/eval/intervals.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Mapping, Sequence

from derta_jax.eval.report import REPORT_FORMAT, write_comparison


def read_report(directory: str) -> dict:
    path = os.path.join(directory, "report.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; is {directory} an evaluation output directory?")
    with open(path, encoding="utf-8") as f:
        try:
            report = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise ValueError(f"{path}: format: expected an evaluation report of format "
                         f"{REPORT_FORMAT}, got {report.get('format') if isinstance(report, dict) else report!r}")
    return report


def seed_summary(reports: Sequence[Mapping], metric: str = "asr_not_refused") -> list[dict]:
    """Per group (suite, k, held_out) present in every report: the metric's value per seed,
    mean, sample standard deviation (0 for one seed), min, max and the t interval over seeds
    (ci95_low/ci95_high; None for one seed)."""
    from derta_jax.eval.intervals import seed_interval

    if not reports:
        raise ValueError("seed_summary: no reports")
    tables = [{(g["suite"], g["k"], g["held_out"]): g for g in r["groups"]} for r in reports]
    shared = set(tables[0]).intersection(*tables[1:])
    summary = []
    for key in sorted(shared, key=lambda k: (k[0], -1 if k[1] is None else k[1],
                                             -1 if k[2] is None else int(k[2]))):
        rates = [table[key][metric] for table in tables]
        if any(rate is None for rate in rates):
            continue
        values = [rate["value"] for rate in rates]
        interval = seed_interval(values)
        summary.append({"suite": key[0], "k": key[1], "held_out": key[2], "values": values,
                        "mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "min": min(values), "max": max(values),
                        "ci95_low": interval["ci95_low"], "ci95_high": interval["ci95_high"],
                        "n_per_seed": [rate["n"] for rate in rates]})
    return summary


def parse_named(values: Sequence[str]) -> dict[str, str]:
    """["name=DIR", ...] -> {name: DIR}; names must be unique and non-empty."""
    named: dict[str, str] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--report={value!r}: expected NAME=DIR")
        if name in named:
            raise ValueError(f"--report={value!r}: the name {name!r} is used twice")
        named[name] = directory
    return named


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m derta_jax.eval.compare",
                                     description="Combine evaluation reports: one table, one curve per model.")
    parser.add_argument("--report", action="append", required=True, help="NAME=DIR (repeat)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        reports = {name: read_report(directory) for name, directory in parse_named(args.report).items()}
        write_comparison(reports, args.out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(reports)} models")
    return 0


def cli() -> None:
    """The console-script entry point (pyproject [project.scripts]), = python -m."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
