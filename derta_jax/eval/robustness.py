"""The stronger attacks a reproduction run faces (issue 16), as extra judged rows of the
run's own evaluation report, so that every table, interval over seeds and plot of the
reproduction covers them like the paper's attacks.

Why here and not in the evaluate/durability commands: those commands evaluate one model;
the reproduction asks, for every recipe and seed, whether the refusal survives
  rank_prefill          rank-assisted prefilling (eval/rank_prefill.py, arXiv 2512.05518) of
                        the world's prefill prompts at the budget's depths: suite
                        "rank_prefill", k = depth;
  ablated_direct        the direct requests answered by the model with its refusal direction
                        projected out (eval/refusal_direction.py, Arditi et al. 2024; the
                        direction from the world's training questions: safety triples vs
                        helpful instructions, the layer chosen on other triples);
  finetune_sft          the direct requests answered after K steps of LoRA fine-tuning on the
                        world's (question, harmful answer) triples (eval/durability.py's
                        attack, the project's trainer; k = K);
  finetune_constrained  the same attack under Qi et al.'s constrained objective
                        (constrained_loss.py): the defence a provider applies to fine-tuning;
  benign_tuned_sft,     the direct requests answered after K steps of a BENIGN downstream
  benign_tuned_constrained  LoRA fine-tune (the world's downstream task, a benign task no
                        training file holds; same sizes), plain and constrained: does
                        ordinary fine-tuning erode the refusal too?
  downstream,           the downstream task's held-out rows (the ones after the fine-tune's)
  downstream_sft,       answered by the model itself, then after K benign steps, plain and
  downstream_constrained  constrained: their accuracy says whether the benign fine-tune
                        learned its task, the cost the constrained objective's safety has.
The attack rows are training triples; the evaluation prompts are the world's evaluation
files, which share no question with them (data/synthetic.py; check_disjoint verifies).
  safe_triggers         the package's 120 safe requests with trigger words (suite
                        "safe_triggers", judged by the keyword judge: the world does not know
                        those questions); an over-refusal check, in the real-model budgets.
A budget names the ones it runs (AttackBudget.include; `reproduce --attacks` chooses).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

FINETUNE_SUITES = {"sft": "finetune_sft", "constrained_sft": "finetune_constrained"}
BENIGN_TUNE_SUITES = {"sft": "benign_tuned_sft", "constrained_sft": "benign_tuned_constrained"}
DOWNSTREAM_SUITE = "downstream"  # the held-out downstream rows, answered before any tuning
DOWNSTREAM_SUITES = {"sft": "downstream_sft", "constrained_sft": "downstream_constrained"}
BENIGN_TUNE_FILE = "benign_sft.jsonl"  # the benign fine-tune's rows, as the trainer read them
SAFE_TRIGGERS_SUITE = "safe_triggers"
# What AttackBudget.include may name, in the order they run (the direction's rows are suite
# "ablated_direct"; the fine-tuning attack's, FINETUNE_SUITES)
ATTACKS = ("rank_prefill", "direction", "safe_triggers", "finetune", "benign_finetune")


@dataclasses.dataclass(frozen=True)
class AttackBudget:
    """Sizes of the robustness attacks of one reproduction budget."""
    finetune_steps: tuple[int, ...]  # K evaluated (each a checkpoint of one attack run)
    finetune_rows: int  # training triples the attack fine-tunes on
    finetune_lr: float  # constant
    finetune_batch: int = 8
    finetune_rank: int = 8
    finetune_alpha: float = 16.0
    direction_prompts: int = 32  # harmful (and harmless) prompts for the direction
    downstream_eval_rows: int = 32  # downstream rows after the fine-tune's, to score
    rank_k: int = 20
    include: tuple[str, ...] = ("rank_prefill", "direction", "finetune")  # of ATTACKS

    def __post_init__(self):
        unknown = [name for name in self.include if name not in ATTACKS]
        if unknown or len(set(self.include)) != len(self.include):
            raise ValueError(f"attacks {','.join(self.include)}: each at most once, from "
                             f"{','.join(ATTACKS)}")

    @property
    def durability_k(self) -> int:
        """The K of the tables (the middle one: 10 of 5, 10, 20)."""
        return sorted(self.finetune_steps)[len(self.finetune_steps) // 2]


def _jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _renamed(items: Sequence[dict], suite: str, k: int | None = None) -> list[dict]:
    """Items of another suite under `suite` (and attack step k), ids prefixed alike."""
    out = []
    for item in items:
        base = item["id"].split("/", 1)[1] if "/" in item["id"] else item["id"]
        out.append({**item, "suite": suite, "k": k,
                    "id": f"{suite}/{base}" + ("" if k is None else f"/K{k}")})
    return out


def attack_rows(world_dir: str, n: int) -> list[tuple[str, dict]]:
    """The first n safety triples as (source, {question, harmful_response}) rows."""
    path = os.path.join(world_dir, "triples.jsonl")
    rows = _jsonl(path)[:n]
    return [(f"{path}:{i + 1}", {"question": r["question"],
                                  "harmful_response": r["harmful_response"]})
            for i, r in enumerate(rows)]


def benign_rows(world_dir: str, n: int) -> list[tuple[str, dict]]:
    """The first n rows of the world's downstream task (downstream.jsonl: a benign task no
    training file holds, so the fine-tune has something to learn) as (source, {question,
    response}) rows; a world written before that file existed gives its helpful rows."""
    path = os.path.join(world_dir, "downstream.jsonl")
    if not os.path.exists(path):
        path = os.path.join(world_dir, "helpful.jsonl")
    rows = _jsonl(path)[:n]
    if len(rows) < n:
        raise ValueError(f"{path}: the benign fine-tune needs {n} rows, the file has {len(rows)}")
    return [(f"{path}:{i + 1}", {"question": r["instruction"], "response": r["output"]})
            for i, r in enumerate(rows)]


def downstream_items(world_dir: str, budget, template) -> list[dict]:
    """The downstream task's held-out items: the `downstream_eval_rows` rows after the
    `finetune_rows` the benign fine-tune trains on, each with its task and answer (so its
    generation is scored by the world's check_answer); [] for a world written before
    downstream.jsonl existed (its benign fine-tune trains on helpful rows the model has
    already learned: no task to score)."""
    from derta_jax.eval.attacks import read_prompt_rows, templated_items

    a = budget.attacks
    path = os.path.join(world_dir, "downstream.jsonl")
    if not os.path.exists(path):
        return []
    rows = read_prompt_rows(path, ("instruction", "task", "answer"))
    needed = a.finetune_rows + a.downstream_eval_rows
    if len(rows) < needed:
        raise ValueError(f"{path}: the benign fine-tune trains on {a.finetune_rows} rows and "
                         f"scores the next {a.downstream_eval_rows}: {needed} are needed, the "
                         f"file has {len(rows)}")
    held = [(source, {"question": row["instruction"], "task": row["task"],
                      "answer": row["answer"]})
            for source, row in rows[a.finetune_rows:needed]]
    return templated_items(held, template, DOWNSTREAM_SUITE)


def _judged(items, model, tokenizer, judge, budget) -> list[dict]:
    from derta_jax.eval.run import greedy_generator, judge_items

    generate = greedy_generator(model, tokenizer, max_new_tokens=budget.max_new_tokens,
                                batch_size=budget.eval_batch_size)
    return judge_items(items, generate, judge, tokenizer=tokenizer,
                       batch_size=budget.eval_batch_size)


def rank_prefill_rows(loaded, tokenizer, world_dir, budget, template, judge) -> list[dict]:
    from derta_jax.eval.attacks import read_prompt_rows
    from derta_jax.eval.rank_prefill import rank_prefill_items
    from derta_jax.eval.run import stop_token_ids

    depths = [d for d in budget.prefill_depths if d > 0]
    rows = read_prompt_rows(os.path.join(world_dir, "eval_prefill.jsonl"),
                            ("question", "harmful_response"))
    items = rank_prefill_items(loaded.model, tokenizer, rows, template, depths=depths,
                               rank_k=budget.attacks.rank_k,
                               eos_token_ids=stop_token_ids(loaded.config, tokenizer),
                               batch_size=budget.eval_batch_size)
    return _judged(items, loaded.model, tokenizer, judge, budget)


def ablation_rows(loaded, tokenizer, world_dir, budget, template, judge,
                  direct_items) -> tuple[list[dict], dict]:
    """The direct requests answered with the refusal direction projected out, and the
    direction record (layer, scores; the vector itself is not kept)."""
    from derta_jax.eval.rank_prefill import refusal_opening_ids
    from derta_jax.eval.refusal_direction import find_direction, orthogonalized
    from derta_jax.eval.run import encode_prompt

    n = budget.attacks.direction_prompts
    triples = _jsonl(os.path.join(world_dir, "triples.jsonl"))
    helpful = _jsonl(os.path.join(world_dir, "helpful.jsonl"))
    held = max(1, n // 4)
    if len(triples) < n + held or len(helpful) < 1:
        raise ValueError(f"refusal direction: the world has {len(triples)} triples; "
                         f"{n + held} are needed")

    def encoded(questions):
        return [encode_prompt(tokenizer, template.render(q)) for q in questions]

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    found = find_direction(loaded.model, encoded([t["question"] for t in triples[:n]]),
                           encoded([h["instruction"] for h in helpful[:n]]),
                           encoded([t["question"] for t in triples[n:n + held]]),
                           refusal_opening_ids(tokenizer, vocab_size=loaded.config.vocab_size),
                           batch_size=budget.eval_batch_size, pad_id=pad)
    ablated = orthogonalized(loaded.model, found["direction"])
    rows = _judged(_renamed(direct_items, "ablated_direct"), ablated, tokenizer, judge, budget)
    record = {key: found[key] for key in ("layer", "scores", "baseline_score",
                                          "layers_considered")}
    return rows, record


def finetune_rows(model_path: str, from_workdir: bool, world_dir: str, attack_dir: str,
                  budget, template_name: str, seed: int, judge_factory,
                  direct_items, train: Callable[[Any], dict],
                  benign: bool = False,
                  downstream: Sequence[dict] = ()) -> tuple[list[dict], dict]:
    """The direct requests answered after each K of a LoRA attack on training triples, with
    plain SFT and with the constrained objective; -> (rows, {objective: last losses}).
    `benign`: the same fine-tunes on the world's downstream task instead (benign_rows;
    workdirs benign_OBJECTIVE, suites BENIGN_TUNE_SUITES), and `downstream`'s held-out
    task items answered at each K too (suites DOWNSTREAM_SUITES). `train(config) -> summary` is
    the trainer's run (the command hands it in: a library module does not import a
    command)."""
    from derta_jax.arg_types import mesh_sizes
    from derta_jax.eval import durability
    from derta_jax.eval.attacks import read_prompt_rows
    from derta_jax.eval.run import load_evaluated

    a = budget.attacks
    if benign:
        rows, field = benign_rows(world_dir, a.finetune_rows), "response"
        file, suites, prefix = BENIGN_TUNE_FILE, BENIGN_TUNE_SUITES, "benign_"
    else:
        rows, field = attack_rows(world_dir, a.finetune_rows), "harmful_response"
        file, suites, prefix = durability.ATTACK_FILE, FINETUNE_SUITES, ""
    durability.check_disjoint(rows, read_prompt_rows(
        os.path.join(world_dir, "eval_direct.jsonl")))
    os.makedirs(attack_dir, exist_ok=True)
    attack_file = os.path.join(attack_dir, file)
    durability.write_attack_rows(rows, attack_file, response_field=field)
    judged, losses = [], {}
    for objective, suite in suites.items():
        workdir = os.path.join(attack_dir, prefix + objective)
        config = durability.attack_config(
            workdir, model_path, attack_file, steps=a.finetune_steps, rank=a.finetune_rank,
            alpha=a.finetune_alpha, lr=a.finetune_lr, batch_size=a.finetune_batch,
            max_length=budget.max_length, template=template_name, seed=seed,
            mesh=mesh_sizes("fsdp:-1"), from_workdir=from_workdir, objective=objective)
        summary = train(config)
        losses[objective] = summary["last_logged_metrics"].get("loss")
        for k in sorted(a.finetune_steps):
            loaded, tokenizer = load_evaluated(workdir, step=k)
            items = _renamed(direct_items, suite, k)
            if benign:
                items += _renamed(downstream, DOWNSTREAM_SUITES[objective], k)
            judged += _judged(items, loaded.model, tokenizer, judge_factory(tokenizer), budget)
    return judged, losses


def safe_trigger_rows(loaded, tokenizer, budget, template) -> list[dict]:
    from derta_jax.eval.attacks import build_suite
    from derta_jax.eval.judges import make_judge

    items = _renamed(build_suite("over_refusal", "builtin:safe_triggers", template),
                     SAFE_TRIGGERS_SUITE)
    return _judged(items, loaded.model, tokenizer, make_judge("keyword", tokenizer=tokenizer),
                   budget)


def robustness_rows(loaded, tokenizer, model_path: str, world_dir: str, attack_dir: str,
                    budget, template_name: str, seed: int,
                    train: Callable[[Any], dict]) -> tuple[list[dict], dict]:
    """The judged rows of every attack the budget includes for one run, and a record of them
    (settings, direction layer and scores, seconds per attack) for its report; `train`: the
    trainer's run."""
    from derta_jax import workdir as wd
    from derta_jax.data.templates import make_template
    from derta_jax.eval.attacks import build_suite
    from derta_jax.eval.judges import make_judge
    from derta_jax.eval.reproduction import JUDGE

    template = make_template(template_name, tokenizer)

    def judge_factory(tok):
        return make_judge(JUDGE, directory=world_dir, tokenizer=tok)

    judge = judge_factory(tokenizer)
    direct = build_suite("direct", os.path.join(world_dir, "eval_direct.jsonl"), template)
    seconds: dict[str, float] = {}  # per attack: what a budget's size costs

    def timed(name, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            seconds[name] = time.perf_counter() - start

    include = budget.attacks.include
    rows, record = [], {"settings": dataclasses.asdict(budget.attacks)}
    if "rank_prefill" in include:
        rows += timed("rank_prefill", rank_prefill_rows, loaded, tokenizer, world_dir, budget,
                      template, judge)
    if "direction" in include:
        ablated, record["direction"] = timed("ablated_direct", ablation_rows, loaded,
                                             tokenizer, world_dir, budget, template, judge,
                                             direct)
        rows += ablated
    if "safe_triggers" in include:
        rows += timed("safe_triggers", safe_trigger_rows, loaded, tokenizer, budget, template)
    if "finetune" in include:
        tuned, record["finetune_last_loss"] = timed(
            "finetune", finetune_rows, model_path, wd.is_workdir(model_path), world_dir,
            attack_dir, budget, template_name, seed, judge_factory, direct, train)
        rows += tuned
    if "benign_finetune" in include:
        downstream = downstream_items(world_dir, budget, template)
        if downstream:
            rows += timed("downstream", _judged, downstream, loaded.model, tokenizer, judge,
                          budget)
        tuned, record["benign_finetune_last_loss"] = timed(
            "benign_finetune", finetune_rows, model_path, wd.is_workdir(model_path), world_dir,
            attack_dir, budget, template_name, seed, judge_factory, direct, train, True,
            downstream)
        rows += tuned
    record["seconds_per_attack"] = seconds
    return rows, record
