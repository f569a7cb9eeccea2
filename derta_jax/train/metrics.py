"""What the user sees: a progress line, TensorBoard events, metrics.jsonl, a loss-curve PNG.

Metrics arrive as device arrays from the step; they are pulled to the host only every
`log_every` steps (one host sync per log, none inside the loop otherwise).

Remote workdirs (gs://...): object stores have no append and tensorboardX writes local
files, so metrics.jsonl and the event files are written in a local staging directory and
copied into the workdir at most every `sync_every_s` seconds and at close.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Mapping, Optional, Sequence

import numpy as np
from etils import epath

from derta_jax import paths

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricLogger:
    """Writes every logged step to TensorBoard and metrics.jsonl, and prints a progress line."""

    def __init__(self, workdir: paths.PathLike, total_steps: int, is_main: bool = True,
                 sync_every_s: float = 60.0):
        self.workdir = paths.resolve(workdir)
        self.total_steps, self.is_main, self.sync_every_s = total_steps, is_main, sync_every_s
        self.history: list[dict] = []
        self._writer = None
        self._jsonl = None
        self._stage: Optional[str] = None  # local staging directory of a remote workdir
        if is_main:
            from tensorboardX import SummaryWriter

            local = os.fspath(self.workdir)
            if paths.is_remote(self.workdir):
                local = self._stage = tempfile.mkdtemp(prefix="derta_jax_metrics_")
                remote_jsonl = self.workdir / METRICS_FILE
                if remote_jsonl.exists():  # a resumed run appends to the earlier records
                    remote_jsonl.copy(epath.Path(local) / METRICS_FILE)
            os.makedirs(local, exist_ok=True)
            self._writer = SummaryWriter(os.path.join(local, TENSORBOARD_DIR))
            self._jsonl = open(os.path.join(local, METRICS_FILE), "a", encoding="utf-8")
        self._t0 = time.perf_counter()
        self._last_time, self._last_step = self._t0, None
        self._last_sync = self._t0

    def log(self, step: int, metrics: Mapping[str, float], epoch: float, tokens: float) -> dict:
        """`metrics` already on the host; `tokens`: non-pad tokens since the last log."""
        now = time.perf_counter()
        elapsed = now - self._last_time
        steps = step - self._last_step if self._last_step is not None else None
        row = {k: float(np.asarray(v)) for k, v in metrics.items()}
        row.update(step=step, epoch=epoch)
        if steps and elapsed > 0:
            row["tokens_per_sec"] = tokens / elapsed
            row["sec_per_step"] = elapsed / steps
        self._last_time, self._last_step = now, step
        self.history.append(row)
        if self.is_main:
            for key, value in row.items():
                if key != "step" and math.isfinite(value):
                    self._writer.add_scalar(f"train/{key}", value, step)
            self._jsonl.write(json.dumps(row, sort_keys=True) + "\n")
            self._jsonl.flush()
            self._print(row)
            if self._stage is not None and now - self._last_sync >= self.sync_every_s:
                self.sync()
        return row

    def sync(self) -> None:
        """Flushes the writers; copies the staged files into a remote workdir."""
        if self._writer is None:
            return
        self._writer.flush()
        self._jsonl.flush()
        if self._stage is not None:
            paths.copy_tree(self._stage, self.workdir)
        self._last_sync = time.perf_counter()

    def _print(self, row: dict) -> None:
        step, total = row["step"], self.total_steps
        width = 24
        done = int(width * step / max(total, 1))
        bar = "#" * done + "." * (width - done)
        eta = row.get("sec_per_step", float("nan")) * (total - step)
        parts = [f"[{bar}] step {step}/{total}", f"epoch {row['epoch']:.2f}",
                 f"loss {_fmt_loss(row.get('loss'))}",
                 f"mle {_fmt_loss(row.get('mle_loss'))}",
                 f"rto {_fmt_loss(row.get('rto_loss'))}",
                 f"lr {row.get('lr', float('nan')):.2e}"]
        if "tokens_per_sec" in row:
            parts.append(f"{row['tokens_per_sec']:.0f} tok/s")
        if "mfu" in row:
            parts.append(f"MFU {100 * row['mfu']:.1f}%")
        parts.append(f"ETA {_fmt_duration(eta)}")
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._jsonl.close()
        if self._stage is not None:
            paths.copy_tree(self._stage, self.workdir)
            shutil.rmtree(self._stage, ignore_errors=True)
        self._writer = self._jsonl = self._stage = None


def plot_loss_curve(history: list[dict], path: paths.PathLike) -> Optional[str]:
    """Loss, MLE and RTO loss against step, and P(refusal) by depth bucket; returns the path
    (local or remote: the PNG is rendered in memory and written through epath)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, (ax_loss, ax_p) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "total"), ("mle_loss", "MLE"), ("rto_loss", "RTO")):
        values = [r.get(key, float("nan")) for r in history]
        if any(math.isfinite(v) for v in values):
            ax_loss.plot(steps, values, label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title("training loss")
    ax_loss.legend()
    buckets = sorted({k for r in history for k in r if k.startswith("p_refusal_bucket_")},
                     key=lambda k: int(k.rsplit("_", 1)[1]))
    for key in buckets:
        ax_p.plot(steps, [r.get(key, float("nan")) for r in history],
                  label=f"depth bucket {key.rsplit('_', 1)[1]}")
    ax_p.set_xlabel("step")
    ax_p.set_ylabel("P(refusal token)")
    ax_p.set_ylim(0, 1)
    ax_p.set_title("P(refusal) along harmful responses")
    if buckets:
        ax_p.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    epath.Path(path).write_bytes(png.getvalue())
    return os.fspath(path)


def tail_mean(history: Sequence[Mapping[str, float]], fraction: float = 0.1,
              min_logs: int = 5) -> dict:
    """Each metric's mean over the run's tail: the logs in the last `fraction` of the steps,
    and at least the last `min_logs` logs (all of them when fewer). A single logged value
    is one batch's, too noisy to summarise a run. -> {first_step, last_step, logs, metrics}."""
    if not history:
        return {}
    last = history[-1]["step"]
    in_window = sum(1 for row in history if row["step"] > last * (1.0 - fraction))
    rows = list(history[-max(in_window, min_logs):])
    keys = sorted({k for row in rows for k in row} - {"step", "epoch"})
    means = {}
    for key in keys:
        values = [row[key] for row in rows if key in row and math.isfinite(row[key])]
        if values:
            means[key] = float(np.mean(values))
    return {"first_step": rows[0]["step"], "last_step": last, "logs": len(rows), "metrics": means}


def _fmt_loss(value) -> str:
    """A loss for the progress line; "-" when the logged steps had no position of that kind
    (e.g. no RTO row in the last batches: its mean is 0/0), rather than "nan"."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.4f}"
