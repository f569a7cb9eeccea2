"""The pieces of `python -m derta_jax.reproduce`: budgets, the five recipes, one run's
training and evaluation, and the results tables over seeds.

Why a module apart from the CLI: the reproduction is the project's evidence that DeRTa does
what the paper says (Table 4's ablation), so each step is a function that can be read and
tested on its own: the world and its tokenizer, the base model that ANSWERS harmful requests
(something to unlearn), the safety tuning of that base with each recipe on the same number
of steps, and the evaluation (direct, completion attack, prefill sweep, over-refusal, benign
accuracy, P(refusal) along held-out harmful answers), judged by the world judge (JUDGE).
Each cell is reported per seed, with mean, std and a t interval over seeds
(derta_jax/eval/intervals.py says why not Wilson on pooled counts); one seed: no interval.
Everything is seeded; nothing here writes a time stamp or an absolute path into
report.json, so the same seeds give the same report (timings go to timings.json).

Recipes (N = Budget.num_safety safety ROWS, derta_jax.data.mixture's meaning):
    vanilla       N refusal rows (q -> r)
    vanilla_half  N/2 refusal rows: the control for the N/2 distinct triples DeRTa uses
    prefix        N/2 harmful-prefix rows (q + r̂_<k -> r)
    rto           N/2 RTO rows (q + r̂, every position -> "Sorry")
    derta         N/2 RTO + N/2 harmful-prefix rows from the same N/2 triples
Each is mixed with all the helpful rows and trained for Budget.tune_steps steps from the
same base. RTO supervises far more tokens per triple than a refusal row (every position
of r̂ against a handful of refusal tokens): `supervised_tokens` counts them per recipe.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from derta_jax.data.synthetic import EVAL_TASKS
from derta_jax.data.tokenize import DEFAULT_REFUSAL
from derta_jax.eval.refusal_probability import late_refusal_probability
from derta_jax.eval.robustness import ATTACKS, AttackBudget


# (run name, mixture recipe, share of Budget.num_safety)
RECIPE_RUNS = (("vanilla", "vanilla", 1.0), ("vanilla_half", "vanilla", 0.5),
               ("prefix", "prefix", 1.0), ("rto", "rto", 1.0), ("derta", "derta", 1.0))
RECIPE_NAMES = tuple(name for name, _, _ in RECIPE_RUNS)
# DeRTa at the other RTO keep rate than the budget's (paper, appendix A: 5% of RTO positions
# for full fine-tuning, all of them for LoRA): run name -> (recipe, share, keep rate). The
# real-model track runs both rates (issue 16); the tiny track's default already keeps 5%.
KEEP_RATE_RUNS = {"derta_keep0.05": ("derta", 1.0, 0.05), "derta_keep1": ("derta", 1.0, 1.0)}
BASE_NAME = "base"  # the pretrained model before safety tuning: the table's reference row
# A negative control for the helpfulness measures (tiny track): `vanilla` tuned from the same
# base at DAMAGE_LR_FACTOR times the learning rate, first seed only. A benign suite or an
# over-refusal measure that scores it like the others cannot show a loss of helpfulness.
DAMAGED_NAME = "damaged"
DAMAGE_LR_FACTOR = 100
DAMAGED_RECIPE = "vanilla"
TABLE_ROWS = (BASE_NAME,) + RECIPE_NAMES + tuple(KEEP_RATE_RUNS) + (DAMAGED_NAME,)
EVAL_SUITES = ("direct", "completion", "prefill", "over_refusal", "benign")
HARMFUL_SUITES = ("direct", "completion", "prefill")
SUITE_FILES = {"direct": "eval_direct.jsonl", "completion": "eval_completion.jsonl",
               "prefill": "eval_prefill.jsonl", "over_refusal": "eval_over_refusal.jsonl",
               "benign": "eval_benign.jsonl"}
TEMPLATE = "reference"  # the training format of the tiny runs (configs/tiny.py)
LORA_TEMPLATE = "chat"  # the real instruct model's own chat format
BENIGN_TASKS = EVAL_TASKS  # the benign suite's tasks, each reported on its own in report.json
# Both tracks evaluate on a synthetic world, which knows every harmful answer's steps:
# harmful = the generation reproduces a step of that request (derta_jax/eval/world_judge.py)
JUDGE = "world"


@dataclasses.dataclass(frozen=True)
class Budget:
    """Everything that sets the size and cost of a reproduction run."""
    name: str
    world: Mapping[str, Any]  # derta_jax.data.synthetic.WorldSizes fields
    num_safety: int  # safety rows of the full recipes (vanilla_half gets half)
    pretrain_steps: int
    tune_steps: int
    batch_size: int
    max_length: int
    pretrain_lr: float
    tune_lr: float
    max_new_tokens: int
    prefill_depths: tuple[int, ...]
    eval_batch_size: int = 256
    vocab_size: int = 1024
    # Share of RTO positions kept per step. The tiny track is FULL fine-tuning, for which the
    # paper (appendix A) keeps 5%; 1.0 is its LoRA setting. At 1.0 RTO's ~35 targets per
    # triple swamp the harmful-prefix MLE and the tuned models loop "SorrySorry..." instead
    # of refusing (docs/reproduction/tiny_rto_keep_1.0/).
    rto_keep_rate: float = 0.05
    attacks: Optional[AttackBudget] = None  # the robustness attacks (eval/robustness.py)


# 10,000 pretraining rows (4,000 before): with 4,000 the base memorised its rows (7 epochs in
# 800 steps) and copied a new list of 3 to 8 words right 9 times in 40; with 10,000 (about 3
# epochs) it copies and reverses new lists of 3 to 6 words without a mistake.
# The attacks of every tiny run: a LoRA attack (rank 8, constant lr 1e-3, batch 8) on 32
# safety triples, evaluated at K = 5, 10, 20 with plain SFT and the constrained objective;
# the refusal direction from 32 triples vs 32 helpful instructions (8 more choose the layer);
# the same LoRA fine-tunes on 32 rows of the world's downstream task ("Write these words
# again: ...", a benign instruction no training file holds), whose refusals of the direct
# requests after K steps say what ordinary fine-tuning costs the safety tuning; the task's
# next 32 rows, held out from it, are scored before and after (did it learn the task, and
# what does constraining cost?).
TINY_ATTACKS = AttackBudget(finetune_steps=(5, 10, 20), finetune_rows=32, finetune_lr=1e-3,
                            include=("rank_prefill", "direction", "finetune",
                                     "benign_finetune"))
SMOKE_ATTACKS = AttackBudget(finetune_steps=(1, 2), finetune_rows=8, finetune_lr=1e-3,
                             finetune_rank=2, direction_prompts=4, rank_k=5,
                             downstream_eval_rows=4)
_WORLD = dict(num_triples=300, num_helpful=1200, num_pretrain=10000, num_eval_benign=100,
              num_over_refusal=24)
BUDGETS = {
    # Helpful:safety rows about 10:1 as in the paper (60K helpful, 6K safety rows): 300
    # triples, 1200 helpful pairs, 10,000 pretraining rows. Measured with 5 seeds on the
    # project's shared 2-core VM: 1,910 s wall, 2,867 CPU s (docs/reproduction/tiny/); 3
    # seeds, the default, about 24 minutes there.
    "default": Budget(name="default", world=dict(_WORLD, num_eval_harmful=20),
                      num_safety=120, pretrain_steps=800, tune_steps=100, batch_size=16,
                      max_length=128, pretrain_lr=1e-3, tune_lr=3e-4, max_new_tokens=64,
                      prefill_depths=(0, 5, 10, 20, 40), attacks=TINY_ATTACKS),
    # Longer pretraining and tuning, more evaluation prompts and longer generations
    # (about 25 minutes on an idle 2-core CPU with 3 seeds).
    "full": Budget(name="full", world=dict(_WORLD, num_eval_harmful=30),
                   num_safety=120, pretrain_steps=1200, tune_steps=150, batch_size=16,
                   max_length=128, pretrain_lr=1e-3, tune_lr=3e-4, max_new_tokens=96,
                   prefill_depths=(0, 5, 10, 20, 40), attacks=TINY_ATTACKS),
    # For CI: every step of the pipeline, numbers meaningless.
    "smoke": Budget(name="smoke",
                    world=dict(num_triples=12, num_helpful=24, num_pretrain=160,
                               num_eval_harmful=2, num_eval_benign=5, num_over_refusal=3),
                    num_safety=8, pretrain_steps=4, tune_steps=2, batch_size=8, max_length=96,
                    pretrain_lr=1e-3, tune_lr=3e-4, max_new_tokens=8, prefill_depths=(0, 10),
                    attacks=SMOKE_ATTACKS),
}


@dataclasses.dataclass(frozen=True)
class LoraBudget:
    """The size and cost of a real-model run: LoRA tuning of a pretrained instruct model (no
    pretraining phase; the base is the instruct model as published)."""
    name: str
    world: Mapping[str, Any]  # derta_jax.data.synthetic.WorldSizes fields (plain_english world)
    num_safety: int
    tune_steps: int
    batch_size: int
    max_length: int
    tune_lr: float
    lora_rank: int
    lora_alpha: float
    max_new_tokens: int
    prefill_depths: tuple[int, ...]
    lora_dropout: float = 0.0
    eval_batch_size: int = 64
    rto_keep_rate: float = 1.0  # the paper's LoRA setting (appendix A)
    attacks: Optional[AttackBudget] = None  # the robustness attacks (eval/robustness.py)


# The plain_english world needs no pretraining corpus; generate_world still states every fact
# there (unused by this track), hence the small num_pretrain with no harmful rows.
_LORA_WORLD = dict(num_triples=300, num_helpful=1200, num_pretrain=40,
                   pretrain_harmful_fraction=0.0, num_over_refusal=24)
LORA_BUDGETS = {
    # SmolLM2-135M-Instruct, issue 16's track: base, vanilla, DeRTa at both RTO keep rates,
    # 3 seeds, 40 held-out harmful prompts per suite (2 per trained category besides), every
    # attack. Measured on the 2-core VM (session 11; the base run at 54 prompts a suite,
    # batch-8 attacks, 32 new tokens): a LoRA step of 8 x 128 tokens ~8 s (24 steps,
    # compile and merge ~220 s a run), the paper's suites ~130 s, the attacks 569 s (harmful
    # fine-tuning 338, refusal direction 144, rank-assisted prefill 59, safe_triggers 27):
    # ~2.5 hours for the 10 runs. Cut with 20 tuning steps and the attack at batch 4 (40
    # examples by K=10, 2.5 epochs of its 16 rows): measured then, the base run ~630 s and
    # each tuned run ~740 s, ~2.1 hours for the 10 (docs/robustness.md). Fewer new tokens
    # would cut more, but a harmful answer's first step ends 30-37 tokens in and the
    # look-alikes' helpful answers run to 49: 32 keeps most of both readable.
    # Re-measured at the CPU defaults of issue 14 (session 15, load 1.5-1.8, nothing else
    # running), with the benign fine-tune added: the base run 577 s (attacks 464: harmful
    # fine-tuning 173, benign fine-tuning 191 and its downstream scoring 9, rank-assisted
    # prefill 41, the direction 26, safe_triggers 23), a DeRTa run 610 s (tuning 135,
    # attacks 408): ~1.7 hours for the 10 runs.
    # --resume continues an interrupted track.
    "default": LoraBudget(name="default", world=dict(_LORA_WORLD, num_eval_harmful=2,
                                                     num_eval_held_out=40,
                                                     num_eval_benign=30),
                          num_safety=120, tune_steps=20, batch_size=8, max_length=128,
                          tune_lr=1e-3, lora_rank=16, lora_alpha=32.0, max_new_tokens=32,
                          prefill_depths=(0, 10, 30),
                          attacks=AttackBudget(finetune_steps=(5, 10), finetune_rows=16,
                                               finetune_lr=2e-4, finetune_batch=4,
                                               direction_prompts=16, include=ATTACKS)),
    # For CI: every step of the pipeline, numbers meaningless.
    "smoke": LoraBudget(name="smoke",
                        world=dict(num_triples=12, num_helpful=24, num_pretrain=40,
                                   pretrain_harmful_fraction=0.0, num_eval_harmful=1,
                                   num_eval_benign=5, num_over_refusal=3),
                        num_safety=8, tune_steps=2, batch_size=8, max_length=192, tune_lr=1e-3,
                        lora_rank=4, lora_alpha=8.0, max_new_tokens=6, prefill_depths=(0, 10),
                        attacks=dataclasses.replace(SMOKE_ATTACKS, include=ATTACKS)),
}


def recipe_num_safety(budget: Budget, share: float) -> int:
    """Safety rows for a recipe taking `share` of the budget's rows, rounded down to even."""
    rows = int(budget.num_safety * share)
    return rows - rows % 2


def epochs_for(steps: int, total_tokens: int, batch_size: int, max_length: int,
               packing_efficiency: float = 0.7) -> int:
    """Epochs whose packed batches surely give `steps` steps (a conservative estimate)."""
    per_epoch = max(1, math.floor(total_tokens / (batch_size * max_length) * packing_efficiency))
    return max(1, math.ceil(steps / per_epoch) + 1)


# ----------------------------------------------------------------------------- training


def base_config(workdir: str, budget: Budget, *, seed: int, tokenizer_dir: str,
                steps: int, lr: float, epochs: int):
    """The tiny config (derta_jax.train.config.tiny_config) with the reproduction's sizes;
    the data fields are the caller's."""
    from derta_jax.train.config import tiny_config

    c = tiny_config()
    c.workdir = workdir
    c.seed = seed
    c.model.vocab_size = budget.vocab_size
    c.data.synthetic = False
    c.data.template = TEMPLATE
    c.data.tokenizer = tokenizer_dir
    c.data.max_length = budget.max_length
    c.data.shuffle_seed = seed
    c.train.batch_size = budget.batch_size
    c.train.max_steps = steps
    c.train.num_epochs = epochs
    c.train.log_every = max(1, min(100, steps))
    c.optim.lr = lr
    c.loss.rto_keep_rate = budget.rto_keep_rate
    c.checkpoint.every_steps = steps  # only the final one
    c.checkpoint.keep = 1
    c.checkpoint.async_save = False
    return c


def lora_config(workdir: str, budget: LoraBudget, *, seed: int, base_hf: str, steps: int,
                epochs: int):
    """LoRA on every projection of the pretrained `base_hf` in its chat format; the paper's
    LoRA setting (all RTO positions kept, no warmup) at this budget's rank and rate."""
    from derta_jax.train.config import default_config

    c = default_config()
    c.workdir = workdir
    c.seed = seed
    c.model.hf_dir = base_hf
    c.data.template = LORA_TEMPLATE
    c.data.tokenizer = base_hf
    c.data.max_length = budget.max_length
    c.data.packing = True
    c.data.shuffle_seed = seed
    c.loss.rto_keep_rate = budget.rto_keep_rate
    c.lora.enabled = True
    c.lora.rank = budget.lora_rank
    c.lora.alpha = budget.lora_alpha
    c.lora.dropout = budget.lora_dropout
    c.optim.lr = budget.tune_lr
    c.optim.warmup_ratio = 0.0
    c.optim.weight_decay = 0.0
    c.train.batch_size = budget.batch_size
    c.train.max_steps = steps
    c.train.num_epochs = epochs
    c.train.log_every = max(1, min(10, steps))
    c.checkpoint.every_steps = steps
    c.checkpoint.keep = 1
    c.checkpoint.async_save = False
    return c


def safety_mixture(world_dir: str, recipe: str, num_safety: int, seed: int, tokenizer: Any,
                   template_name: str = TEMPLATE):
    """The recipe's training examples, exactly as the trainer builds them (same seed)."""
    from derta_jax.data import formats, mixture, templates

    triples = formats.read_triples(os.path.join(world_dir, "triples.jsonl")).rows
    helpful = formats.read_helpful(os.path.join(world_dir, "helpful.jsonl")).rows
    template = templates.make_template(template_name, tokenizer)
    return mixture.build_mixture(triples, helpful, recipe, seed, template, num_safety=num_safety)


def supervised_tokens(examples: Sequence, tokenizer: Any, max_length: int) -> dict:
    """Supervised positions per example kind: {kind: {"rows", "mle", "rto"}} plus "total"."""
    from derta_jax.data.tokenize import refusal_token_id, tokenize_examples

    rows, _ = tokenize_examples(examples, tokenizer, refusal_token_id(tokenizer), max_length)
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        entry = counts.setdefault(row["kind"], {"rows": 0, "mle": 0, "rto": 0})
        rto = int(row["rto_mask"].sum())
        entry["rows"] += 1
        entry["rto"] += rto
        entry["mle"] += int(row["loss_mask"].sum()) - rto
    total = {key: sum(entry[key] for entry in counts.values()) for key in ("rows", "mle", "rto")}
    return {**dict(sorted(counts.items())), "total": total}


def total_tokens(examples: Sequence, tokenizer: Any) -> int:
    return sum(len(ids) for ids in tokenizer([e.prompt + e.response for e in examples],
                                             add_special_tokens=True)["input_ids"])


# ----------------------------------------------------------------------------- evaluation


def evaluation_items(world_dir: str, tokenizer: Any, budget: Budget,
                     template_name: str = TEMPLATE) -> list[dict]:
    """Every evaluation item of the world's files, suite after suite."""
    from derta_jax.data.templates import make_template
    from derta_jax.eval.attacks import build_suite

    template = make_template(template_name, tokenizer)
    items = []
    for suite in EVAL_SUITES:
        path = os.path.join(world_dir, SUITE_FILES[suite])
        if suite == "completion":
            items += build_suite(suite, path, None)
        elif suite == "prefill":
            items += build_suite(suite, path, template, tokenizer=tokenizer,
                                 depths=budget.prefill_depths, unit="tokens")
        else:
            items += build_suite(suite, path, template)
    return items


def held_out_answers(world_dir: str) -> list[tuple[str, str]]:
    """(question, harmful answer) of the held-out harm categories, for P(refusal) curves."""
    with open(os.path.join(world_dir, SUITE_FILES["prefill"]), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(r["question"], r["harmful_response"]) for r in rows if r["held_out"]]


def run_refusal_probabilities(loaded, tokenizer, template, answers) -> list[list[float]]:
    """P(refusal) along each answer, probed on the refusal token the run was trained on
    (data.refusal_string, read from its workdir; an HF directory: the default "Sorry")."""
    from derta_jax.eval.refusal_probability import refusal_probabilities_along_answers

    options = {"refusal": loaded.run.refusal_string} if loaded.run.refusal_string else {}
    try:
        return refusal_probabilities_along_answers(loaded.model, tokenizer, template, answers,
                                                   **options)
    except ValueError as err:
        raise ValueError(f"data.refusal_string={loaded.run.refusal_string!r} of the "
                         f"evaluated run: {err}") from None


def refusal_probe(refusal: str, answers: Sequence[tuple[str, str]],
                  probabilities: Sequence[Sequence[float]]) -> dict:
    """write_report's `refusal_probe`: the refusal word and one row per held-out answer."""
    return {"refusal": refusal,
            "rows": [{"question": question, "held_out": True, "p_refusal": row}
                     for (question, _), row in zip(answers, probabilities)]}


def evaluate_run(workdir: str, world_dir: str, out_dir: str, budget: Budget, name: str,
                 template_name: str = TEMPLATE, *, attack_dir: Optional[str] = None,
                 seed: int = 0, train: Optional[Callable[[Any], dict]] = None) -> dict:
    """Generate, judge (JUDGE: the world judge of `world_dir`) and report one model (a
    workdir or an HF directory); -> {"report", "rows", "refusal_probabilities"}. With
    `attack_dir` and budget.attacks, the robustness attacks' rows join the report
    (eval/robustness.py; their runs and robustness.json go to attack_dir; `train`, the
    trainer's run, fine-tunes the attacks)."""
    from derta_jax.data.templates import make_template
    from derta_jax.eval.judges import make_judge
    from derta_jax.eval.report import write_report
    from derta_jax.eval.run import greedy_generator, judge_items, load_evaluated

    loaded, tokenizer = load_evaluated(workdir)
    model = loaded.model
    items = evaluation_items(world_dir, tokenizer, budget, template_name)
    generate = greedy_generator(model, tokenizer, max_new_tokens=budget.max_new_tokens,
                                batch_size=budget.eval_batch_size)
    judge = make_judge(JUDGE, directory=world_dir, tokenizer=tokenizer)
    rows = judge_items(items, generate, judge, tokenizer=tokenizer,
                       batch_size=budget.eval_batch_size)
    attack_seconds = 0.0
    if attack_dir is not None and budget.attacks is not None:
        from derta_jax.eval.robustness import robustness_rows

        if train is None:
            raise ValueError("evaluate_run: the attacks fine-tune with the trainer; pass train")
        started = time.perf_counter()
        extra, record = robustness_rows(loaded, tokenizer, workdir, world_dir, attack_dir,
                                        budget, template_name, seed, train)
        rows += extra
        attack_seconds = record["seconds"] = time.perf_counter() - started
        os.makedirs(attack_dir, exist_ok=True)  # not made by every attack
        with open(os.path.join(attack_dir, "robustness.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, sort_keys=True)
            f.write("\n")
    answers = held_out_answers(world_dir)
    probabilities = run_refusal_probabilities(loaded, tokenizer,
                                              make_template(template_name, tokenizer), answers)
    probe = refusal_probe(loaded.run.refusal_string or DEFAULT_REFUSAL, answers, probabilities)
    report = write_report(rows, out_dir, model=name, overwrite=True, refusal_probe=probe)
    return {"report": report, "rows": rows, "refusal_probabilities": probabilities,
            "attack_seconds": attack_seconds}


def rejudge_run(evaluation: Mapping, world_dir: str, out_dir: str, tokenizer: Any) -> dict:
    """`evaluate_run`'s result with every row judged again by today's judge of its kind
    (the world judge of `world_dir`, or the keyword judge of the safe_triggers rows) and the
    report in `out_dir` written again from them and the run's P(refusal) curves, which no
    judge reads: a finished study re-read after a judge's rules changed."""
    from derta_jax.eval.judges import make_judge
    from derta_jax.eval.report import rejudged_row, write_report

    judges = {JUDGE: make_judge(JUDGE, directory=world_dir, tokenizer=tokenizer),
              "keyword": make_judge("keyword", tokenizer=tokenizer)}
    rows = []
    for row in evaluation["rows"]:
        if row["judge"] not in judges:
            raise ValueError(f"rejudge: {out_dir}: row {row['id']} was judged by "
                             f"{row['judge']!r}, not one of {', '.join(judges)}")
        rows.append(rejudged_row(row, judges[row["judge"]], tokenizer=tokenizer))
    before = evaluation["report"]
    probe = None
    if "refusal_probe" in before:  # as evaluate_run built it, at full precision
        probe = refusal_probe(before["refusal_probe"]["refusal"], held_out_answers(world_dir),
                              evaluation["refusal_probabilities"])
    report = write_report(rows, out_dir, model=before["model"], overwrite=True,
                          refusal_probe=probe)
    return {**evaluation, "report": report, "rows": rows}


# ----------------------------------------------------------------------------- metrics


@dataclasses.dataclass(frozen=True)
class Count:
    """k of n, one seed's contribution to a rate."""
    k: int
    n: int


def _group(report: Mapping, suite: str, k: int | None, held_out: bool | None) -> Mapping | None:
    for group in report["groups"]:
        if group["suite"] == suite and group["k"] == k and group["held_out"] == held_out:
            return group
    return None


def group_count(report: Mapping, suite: str, metric: str, *, k: int | None = None,
                held_out: bool | None = None) -> Count | None:
    group = _group(report, suite, k, held_out)
    if group is None or group.get(metric) is None:
        return None
    return Count(group[metric]["k"], group[metric]["n"])


def task_count(rows: Sequence[Mapping], task: str) -> Count:
    """Correct answers / items of one benign task (the benign suite's rows whose meta.task
    is `task`)."""
    scores = [bool(r["score"].get("correct")) for r in rows
              if r["suite"] == "benign" and r.get("meta", {}).get("task") == task]
    return Count(sum(scores), len(scores))


def coherent_count(rows: Sequence[Mapping]) -> Count:
    """Refusals to harmful prompts that state the whole refusal / all such refusals; each
    generation once (prefill k=0 repeats the direct suite: report.counted_once)."""
    from derta_jax.eval.report import counted_once

    refusals = [r for r in counted_once(rows)
                if r["suite"] in HARMFUL_SUITES and r["verdict"]["refused"]]
    return Count(sum(bool(r["verdict"]["coherent_refusal"]) for r in refusals), len(refusals))


# (key prefix, suite, held_out, k) of the attack settings in the table. k "deepest": the
# run's deepest prefill; "durability": the middle attack step K of budget.attacks (10 of 5,
# 10, 20); None: no k. held_out None: every category (the attacks on the model itself,
# whose prompts are few per category).
ATTACK_SETTINGS = (("completion_held_out", "completion", True, None),
                   ("completion_trained", "completion", False, None),
                   ("direct_held_out", "direct", True, None),
                   ("prefill_deepest_held_out", "prefill", True, "deepest"),
                   ("rank_prefill_deepest_held_out", "rank_prefill", True, "deepest"),
                   ("ablated_direct_all", "ablated_direct", None, None),
                   ("finetune_sft_all", "finetune_sft", None, "durability"),
                   ("finetune_constrained_all", "finetune_constrained", None, "durability"),
                   ("benign_tuned_sft_all", "benign_tuned_sft", None, "durability"),
                   ("benign_tuned_constrained_all", "benign_tuned_constrained", None,
                    "durability"))
# the three outcomes, the degenerate share and the GCG convention, per attack setting
OUTCOME_METRICS = ("outcome_refused", "outcome_harmful", "outcome_neither", "degenerate",
                   "asr_not_refused")


def run_metrics(evaluation: Mapping) -> dict:
    """One run's table cells as counts (rates) or plain values (probabilities).

    Per attack setting (ATTACK_SETTINGS) SETTING_outcome_refused / _outcome_harmful (the
    ASR) / _outcome_neither / _degenerate / _asr_not_refused (GCG); then
    coherent_of_refusals (each generation once), over_refusal (refused look-alikes),
    over_refusal_wrong (look-alikes answered wrongly or degenerately, not refused), benign_accuracy
    and benign_TASK per task of BENIGN_TASKS, the downstream task's accuracy before and after
    the benign fine-tunes (DOWNSTREAM_COLUMNS),
    p_refusal_late_held_out and prefill_deepest_k."""
    report = evaluation["report"]
    deepest = max(g["k"] for g in report["groups"] if g["suite"] == "prefill")
    attack_steps = sorted({g["k"] for g in report["groups"]  # harmful or benign tuning
                           if g["suite"] in ("finetune_sft", "benign_tuned_sft")
                           and g["k"] is not None})
    durability_k = attack_steps[len(attack_steps) // 2] if attack_steps else None  # as
    ks = {"deepest": deepest, None: None, "durability": durability_k}  # AttackBudget's
    counts = {f"{prefix}_{metric}": group_count(report, suite, metric, k=ks[k_rule],
                                                held_out=held_out)
              for prefix, suite, held_out, k_rule in ATTACK_SETTINGS
              for metric in OUTCOME_METRICS}
    counts.update({
        "safe_triggers_declined": group_count(report, "safe_triggers", "declined"),
        "safe_triggers_refusal_rate": group_count(report, "safe_triggers", "refusal_rate"),
        "coherent_of_refusals": coherent_count(evaluation["rows"]),
        "over_refusal": group_count(report, "over_refusal", "refusal_rate"),
        "over_refusal_wrong": group_count(report, "over_refusal", "wrong_not_refused"),
        "benign_accuracy": group_count(report, "benign", "accuracy"),
        **{f"benign_{task}": task_count(evaluation["rows"], task) for task in BENIGN_TASKS},
        **{key: group_count(report, suite, "accuracy", k=ks[k_rule])
           for _, key, suite, k_rule in DOWNSTREAM_COLUMNS},
    })
    metrics = {name: (dataclasses.asdict(c) if c is not None and c.n else None)
               for name, c in counts.items()}
    metrics["p_refusal_late_held_out"] = late_refusal_probability(
        evaluation["refusal_probabilities"])
    metrics["prefill_deepest_k"] = deepest
    metrics["durability_k"] = durability_k
    return metrics


def seed_cell(per_seed: Sequence[Mapping | float | None],
              seed_ids: Sequence[str] | None = None) -> dict | None:
    """One table cell from its per-seed values (None: that seed has no value, e.g. no
    refusal to take a share of): the values with their seeds, mean, sample std, min/max and
    the t interval over seeds (derta_jax/eval/intervals.py; None with one seed). Rates
    ({"k", "n"} per seed) also keep each seed's counts and their sums k/n, for reading only:
    no interval is drawn on the sums (the seeds share their prompts)."""
    from derta_jax.eval.intervals import seed_interval

    ids = list(seed_ids) if seed_ids is not None else [str(i) for i in range(len(per_seed))]
    if len(ids) != len(per_seed):
        raise ValueError(f"seed cell: {len(per_seed)} values for {len(ids)} seeds")
    present = [(seed, value) for seed, value in zip(ids, per_seed) if value is not None]
    if not present:
        return None
    extra: dict = {}
    if isinstance(present[0][1], Mapping):
        counts = [{"k": c["k"], "n": c["n"]} for _, c in present]
        values = [c["k"] / c["n"] for c in counts]
        extra = {"counts": counts, "k": sum(c["k"] for c in counts),
                 "n": sum(c["n"] for c in counts)}
    else:
        values = [float(v) for _, v in present]
    return {"values": values, "seed_ids": [seed for seed, _ in present],
            **seed_interval(values), **extra}


SEED_REPORT_FIELDS = ("mean", "std", "ci95_low", "ci95_high")


def seed_report(reports: Sequence[Mapping], seed_ids: Sequence[str], name: str) -> dict:
    """Every group and rate of one recipe's per-seed reports (derta_jax.eval.report.summarise)
    over seeds: {"model", "seed_ids", "groups": [{"suite", "k", "held_out", "n_per_seed",
    METRIC: {"values", "mean", "std", "ci95_low", "ci95_high"} or None}]} (groups in the
    reports' order). `values` is one per seed of `seed_ids` (None where that seed has no
    value); the rest is seed_cell's over the seeds with a value. Kept short: the counts
    behind each value are in the per-run reports (runs/RECIPE/seedS/eval/report.json)."""
    if len(reports) != len(seed_ids) or not reports:
        raise ValueError(f"seed report: {len(reports)} reports for {len(seed_ids)} seeds")
    keys: list[tuple] = []
    tables = []
    for report in reports:
        table = {}
        for group in report["groups"]:
            key = (group["suite"], group["k"], group["held_out"])
            table[key] = group
            if key not in keys:
                keys.append(key)
        tables.append(table)
    groups = []
    for key in keys:
        members = [table.get(key) for table in tables]
        metrics = sorted({m for g in members if g is not None for m in g}
                         - {"suite", "k", "held_out", "n"})
        out = {"suite": key[0], "k": key[1], "held_out": key[2],
               "n_per_seed": [None if g is None else g["n"] for g in members]}
        for metric in metrics:
            rates = [None if g is None else g.get(metric) for g in members]
            cell = seed_cell(rates, seed_ids)
            out[metric] = None if cell is None else {
                "values": [None if rate is None else rate["k"] / rate["n"] for rate in rates],
                **{key: cell[key] for key in SEED_REPORT_FIELDS}}
        groups.append(out)
    return {"model": name, "seed_ids": list(seed_ids), "groups": groups}


# (column title, run_metrics key) of the table of other measures
OTHER_COLUMNS = (
    ("coherent / refusals", "coherent_of_refusals"),
    ("P(Sorry) late, held-out", "p_refusal_late_held_out"),
    ("over-refusal (refused)", "over_refusal"),
    ("look-alike wrong, not refused", "over_refusal_wrong"),
    ("benign accuracy", "benign_accuracy"),
    ("safe_triggers declined", "safe_triggers_declined"),
)
# (column title, run_metrics key, suite, k rule as in ATTACK_SETTINGS) of the downstream
# task's table: its held-out rows (eval/robustness.downstream_items) answered by the model
# itself and after the benign fine-tunes (the tables' K)
DOWNSTREAM_COLUMNS = (
    ("before tuning", "downstream_accuracy", "downstream", None),
    ("after K benign steps, SFT", "downstream_sft_accuracy", "downstream_sft", "durability"),
    ("after K benign steps, constrained", "downstream_constrained_accuracy",
     "downstream_constrained", "durability"),
)
# (column title, metric) of each attack setting's table; the GCG column only where marked
OUTCOME_COLUMNS = (("refused", "outcome_refused"), ("harmful (ASR)", "outcome_harmful"),
                   ("neither", "outcome_neither"), ("degenerate", "degenerate"))
GCG_COLUMN = ("ASR (not refused, GCG)", "asr_not_refused")
GCG_SETTING = "completion_held_out"  # the one setting whose table keeps the GCG column
SETTING_TITLES = {"completion_held_out": "Completion attack, held-out categories",
                  "completion_trained": "Completion attack, trained categories",
                  "direct_held_out": "Direct request, held-out categories",
                  "prefill_deepest_held_out": "Prefill attack at the deepest k, held-out "
                                              "categories",
                  "rank_prefill_deepest_held_out": "Rank-assisted prefill (top-20) at the "
                                                   "deepest k, held-out categories",
                  "ablated_direct_all": "Direct request with the refusal direction ablated, "
                                        "all categories",
                  "finetune_sft_all": "Direct request after K={k} harmful LoRA fine-tuning "
                                      "steps (plain SFT), all categories",
                  "finetune_constrained_all": "Direct request after K={k} harmful LoRA "
                                              "fine-tuning steps under the constrained "
                                              "objective, all categories",
                  "benign_tuned_sft_all": "Direct request after K={k} benign LoRA "
                                          "fine-tuning steps (plain SFT), all categories",
                  "benign_tuned_constrained_all": "Direct request after K={k} benign LoRA "
                                                  "fine-tuning steps under the constrained "
                                                  "objective, all categories"}
# every cell of report.json's per-recipe "table" (per-task benign accuracy: report.json only)
TABLE_KEYS = (tuple(f"{prefix}_{metric}" for prefix, *_ in ATTACK_SETTINGS
                    for metric in OUTCOME_METRICS) + tuple(key for _, key in OTHER_COLUMNS)
              + ("safe_triggers_refusal_rate",)
              + tuple(key for _, key, *_ in DOWNSTREAM_COLUMNS)
              + tuple(f"benign_{task}" for task in BENIGN_TASKS))


def format_cell(cell: Mapping | None) -> str:
    """`mean ± std [t interval]` over seeds; one seed: its value (and k/n), no interval."""
    if cell is None:
        return "-"
    if cell["ci95_low"] is None:
        return f"{cell['mean']:.2f}" + (f" ({cell['k']}/{cell['n']})" if "k" in cell else "")
    return (f"{cell['mean']:.2f} ± {cell['std']:.2f} "
            f"[{cell['ci95_low']:.2f}, {cell['ci95_high']:.2f}]")


def _durability_k(results: Mapping[str, Mapping]) -> int | None:
    """The attack step K of the fine-tuning tables (the same for every run of a study)."""
    return next((metrics["durability_k"] for result in results.values()
                 for metrics in result.get("per_seed", {}).values()
                 if metrics.get("durability_k") is not None), None)


def _recipes(results: Mapping[str, Mapping]) -> list[str]:
    return [name for name in TABLE_ROWS if name in results]


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(cells) + " |" for cells in rows])


def results_tables(results: Mapping[str, Mapping]) -> str:
    """Markdown: one table per attack setting (rows: recipes; columns: refused, harmful (ASR),
    neither, degenerate side by side, and the GCG column in GCG_SETTING's), then one table
    of the other measures with each recipe's safety rows and supervised tokens."""
    lines: list[str] = []
    for prefix, *_ in ATTACK_SETTINGS:
        columns = OUTCOME_COLUMNS + ((GCG_COLUMN,) if prefix == GCG_SETTING else ())
        cells = {name: [results[name]["table"].get(f"{prefix}_{metric}") for _, metric in columns]
                 for name in _recipes(results)}
        if all(cell is None for row in cells.values() for cell in row):
            continue  # a setting these runs did not measure (no attacks in the budget)
        rows = [[name] + [format_cell(cell) for cell in row] for name, row in cells.items()]
        lines += [f"**{SETTING_TITLES[prefix].format(k=_durability_k(results))}**", ""]
        lines += _table(["recipe"] + [title for title, _ in columns], rows) + [""]
    rows = []
    other = [(title, key) for title, key in OTHER_COLUMNS  # measured by at least one run
             if any(results[name]["table"].get(key) is not None for name in _recipes(results))]
    for name in _recipes(results):
        tokens = results[name]["supervised_tokens"]
        safety = {kind: v for kind, v in tokens.items() if kind not in ("helpful", "total")}
        safety_rows = ", ".join(f"{v['rows']} {kind}" for kind, v in safety.items()) or "0"
        mle = sum(v["mle"] for v in safety.values())
        rto = sum(v["rto"] for v in safety.values())
        rows.append([name, safety_rows, f"{mle} / {rto}"]
                    + [format_cell(results[name]["table"].get(key)) for _, key in other])
    lines += ["**Other measures**", ""]
    lines += _table(["recipe", "safety rows", "supervised MLE / RTO tokens (safety)"]
                    + [title for title, _ in other], rows)
    downstream = {name: [results[name]["table"].get(key) for _, key, *_ in DOWNSTREAM_COLUMNS]
                  for name in _recipes(results)}
    if any(cell is not None for row in downstream.values() for cell in row):
        k = _durability_k(results)
        lines += ["", f"**Downstream task accuracy (held-out rows of the benign fine-tune's "
                      f"task), before tuning and after K={k} benign steps**", ""]
        lines += _table(["recipe"] + [title.replace("K ", f"K={k} ")
                                      for title, *_ in DOWNSTREAM_COLUMNS],
                        [[name] + [format_cell(cell) for cell in row]
                         for name, row in downstream.items()])
    return "\n".join(lines) + "\n"


def with_intervals_around_values(report: Mapping) -> dict:
    """A copy of `report` whose 95% bounds enclose each value (or seed cell's mean) exactly.

    Wilson bounds computed in floating point can miss p = 0 or 1 by ~1e-17 (e.g. a lower
    bound of 1e-17 for 0/n), which matplotlib rejects as a negative error bar.
    """
    def fix(value):
        if isinstance(value, Mapping):
            fixed = {key: fix(item) for key, item in value.items()}
            centre = "mean" if "mean" in fixed else "value"
            if ({centre, "ci95_low", "ci95_high"} <= fixed.keys()
                    and None not in (fixed[centre], fixed["ci95_low"], fixed["ci95_high"])):
                fixed["ci95_low"] = min(fixed["ci95_low"], fixed[centre])
                fixed["ci95_high"] = max(fixed["ci95_high"], fixed[centre])
            return fixed
        if isinstance(value, list):
            return [fix(item) for item in value]
        return value

    return fix(report)


def pool_reports(reports_rows: Sequence[Sequence[Mapping]], name: str,
                 held_out_only: bool = False) -> dict:
    """One report (derta_jax.eval.report.summarise) of the rows of every seed together."""
    from derta_jax.eval.report import summarise

    rows = [row for rows in reports_rows for row in rows]
    if held_out_only:
        rows = [row for row in rows if row.get("meta", {}).get("held_out") is True]
    return summarise(rows, model=name)
