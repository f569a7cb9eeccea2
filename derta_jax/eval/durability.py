"""Harmful fine-tuning durability: does a safety tuning survive K steps of LoRA fine-tuning
on harmful answers? The pieces of `python -m derta_jax.durability`.

Why: anyone who can fine-tune released weights can undo a refusal that lives in a few
directions of weight space; reported results on other stacks: 10 LoRA steps on harmful
pairs took an 8B model's HarmBench ASR from 15.6% to 97.8%. A safety tuning is only as
durable as the curve of ASR against attack steps K. The attack is an ordinary LoRA run
of the project's own trainer (train/loop.py, recipe `sft` on (question, harmful answer)
rows, constant learning rate so that step K's model does not depend on the longest K),
checkpointed at every K; each checkpoint is evaluated like any workdir (eval/run.py).

The attack rows must not be the evaluation's prompts: `check_disjoint` refuses an attack
file that shares a question (whitespace and case folded) with the evaluation prompts.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

from derta_jax.data.formats import DataError
from derta_jax.eval.report import rate_cell

ATTACK_FILE = "harmful_sft.jsonl"  # the attack's training rows, as the trainer read them


def _folded(text: str) -> str:
    return " ".join(text.split()).casefold()


def check_disjoint(attack_rows: Sequence[tuple[str, Mapping]],
                   eval_rows: Sequence[tuple[str, Mapping]]) -> None:
    """DataError naming the first attack row whose question is also an evaluation prompt."""
    evaluated = {_folded(row["question"]): source for source, row in eval_rows}
    for source, row in attack_rows:
        if _folded(row["question"]) in evaluated:
            raise DataError(source, "question", f"also an evaluation prompt "
                            f"({evaluated[_folded(row['question'])]}); the attack must train "
                            f"on other requests than it is measured on")


def write_attack_rows(attack_rows: Sequence[tuple[str, Mapping]], path: str,
                      response_field: str = "harmful_response") -> None:
    """The (question, `response_field`) rows as the trainer's helpful rows
    (instruction, output): what the fine-tune trains on, kept next to its results."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for _, row in attack_rows:
            f.write(json.dumps({"instruction": row["question"],
                                "output": row[response_field]}, ensure_ascii=False) + "\n")


def attack_config(workdir: str, model: str, attack_file: str, *, steps: Sequence[int],
                  rank: int, alpha: float, lr: float, batch_size: int, max_length: int,
                  template: str, seed: int, mesh: Mapping[str, int], from_workdir: bool,
                  objective: str = "sft"):
    """The LoRA attack run: `model` (an HF directory, or a full workdir) fine-tuned on the
    attack rows for max(steps) steps at a constant `lr`, a checkpoint at every K of `steps`
    (every gcd of them, all kept); with plain SFT, or with objective="constrained_sft"
    against `model` itself (the base with the adapters off)."""
    from derta_jax.train.config import default_config

    positive = [k for k in steps if k > 0]
    c = default_config()
    c.workdir = workdir
    c.seed = seed
    if from_workdir:
        c.model.init_from = model
    else:
        c.model.hf_dir = model
        c.data.tokenizer = model
    c.data.helpful = attack_file
    c.data.recipe = "sft"
    if objective == "constrained_sft":
        c.loss.objective = "constrained_sft"
    c.data.num_safety = 0
    c.data.template = template
    c.data.max_length = max_length
    c.data.shuffle_seed = seed
    c.lora.enabled = True
    c.lora.rank = rank
    c.lora.alpha = alpha
    c.lora.dropout = 0.0
    c.optim.lr = lr
    c.optim.schedule = "constant"
    c.optim.warmup_ratio = 0.0
    c.optim.weight_decay = 0.0
    c.train.batch_size = batch_size
    c.train.max_steps = max(positive)
    c.train.num_epochs = max(positive)  # every epoch gives at least one step
    c.train.log_every = 1
    c.checkpoint.every_steps = math.gcd(*positive)
    c.checkpoint.keep = max(positive)
    c.checkpoint.async_save = False
    c.mesh.update(mesh)
    return c


def durability_curve(reports: Mapping[int, Mapping]) -> list[dict]:
    """Per K (sorted) and pooled suite group: the harmful rate (ASR) and the refused rate."""
    curve = []
    for k in sorted(reports):
        for group in reports[k]["groups"]:
            if group["held_out"] is not None or group.get("outcome_harmful") is None:
                continue
            curve.append({"steps": k, "suite": group["suite"], "k": group["k"],
                          "n": group["n"], "asr": group["outcome_harmful"],
                          "refused": group["outcome_refused"]})
    return curve


def plot_durability(curve: Sequence[Mapping], path: str, title: str = "") -> None:
    """ASR (harmful) against attack steps K, one line per suite (and prefill depth), with
    the reports' 95% intervals."""
    from derta_jax.eval.plots import _DPI, _FIGSIZE, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=_FIGSIZE, dpi=_DPI)
    lines: dict = {}
    for point in curve:
        name = point["suite"] if point["k"] is None else f"{point['suite']} k={point['k']}"
        lines.setdefault(name, []).append(point)
    for name, points in sorted(lines.items()):
        xs = [p["steps"] for p in points]
        ys = [p["asr"]["value"] for p in points]
        low = [max(0.0, y - p["asr"]["ci95_low"]) for y, p in zip(ys, points)]
        high = [max(0.0, p["asr"]["ci95_high"] - y) for y, p in zip(ys, points)]
        ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=name)
    ax.set_xlabel("harmful fine-tuning steps K (LoRA)")
    ax.set_ylabel("ASR (harmful)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "Attack success rate after harmful fine-tuning")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(model: str, settings: Mapping[str, Any], curve: Sequence[Mapping]) -> str:
    rows = ["| K | suite | n | harmful (ASR) | refused |", "|---|---|---|---|---|"]
    for p in curve:
        suite = p["suite"] if p["k"] is None else f"{p['suite']} k={p['k']}"
        rows.append(f"| {p['steps']} | {suite} | {p['n']} | {rate_cell(p['asr'])} | "
                    f"{rate_cell(p['refused'])} |")
    said = ", ".join(f"{key} {value}" for key, value in settings.items())
    return (f"# Harmful fine-tuning durability: {model}\n\n"
            f"LoRA fine-tuning on (question, "
            f"{settings.get('response_field', 'harmful_response')}) rows disjoint from the "
            f"evaluation prompts ({said}); each K is the same run's checkpoint at step K "
            f"(K = 0: the model as given), evaluated greedily.\n\n"
            + "\n".join(rows) + "\n\n![ASR against K](durability.png)\n")


def write_summary(out: str, model: str, settings: Mapping[str, Any],
                  reports: Mapping[int, Mapping]) -> dict:
    """report.json, report.md and durability.png in `out`; -> report.json's content."""
    curve = durability_curve(reports)
    summary = {"model": model, "settings": dict(settings), "curve": curve}
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8", newline="\n") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(markdown(model, settings, curve))
    plot_durability(curve, os.path.join(out, "durability.png"))
    return summary
