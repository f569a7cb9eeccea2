"""Harmful fine-tuning durability of a (safety-tuned) model: ASR against attack steps K.

    python -m derta_jax.durability --model=HF_DIR_or_WORKDIR --attack=HARMFUL.jsonl \\
        --prompts=EVAL.jsonl --out=DIR [--steps=0,5,10,20] [--lora_rank=8] [--lora_alpha=16]
        [--lr=1e-4] [--batch_size=8] [--max_length=512] [--template=chat]
        [--suites=direct,completion] [--max_new_tokens=128] [--eval_batch_size=16]
        [--judge=keyword|world --world=DIR] [--mesh=fsdp:-1] [--seed=0] [--overwrite]
        [--objective=sft|constrained_sft] [--response_field=harmful_response]

Why: a safety tuning that a few steps of fine-tuning undo is not a safety property of the
weights one releases (derta_jax/eval/durability.py). This command LoRA-fine-tunes --model on
--attack's (question, harmful_response) rows with the project's own trainer, keeping the
checkpoint at every K of --steps, and evaluates K = 0 (the model as given) and every
checkpoint on --prompts (rows with question; and harmful_response for --suites=prefill or
rank_prefill), greedily, judged by --judge. The attack rows must not share a question
with --prompts.

--objective=constrained_sft fine-tunes with Qi et al.'s token-wise constrained objective
against the model as given (derta_jax/constrained_loss.py) instead of plain SFT: the defence
a model provider applies to its customers' fine-tuning. --response_field names the answer
field the fine-tune trains on: harmful_response for an attack, e.g. response for a benign
downstream fine-tune (its ASR curve measures the refusal that benign tuning erodes).

Writes DIR/attack/ (the attack rows as trained, harmful_sft.jsonl, and the LoRA workdir),
DIR/eval/kK/ (each K's evaluate report), DIR/report.json (ASR and refused rate per K and
suite, with 95% intervals), DIR/report.md and DIR/durability.png. An existing non-empty
--out is refused unless --overwrite. Bad rows exit 2 with FILE:LINE: field: problem.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from derta_jax.arg_types import int_list, mesh_sizes as _mesh, prefill_depths as _depths
from derta_jax.data.formats import DataError
from derta_jax.data.templates import TEMPLATE_NAMES

SUITE_CHOICES = ("direct", "completion", "prefill", "rank_prefill")


def _suites(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names or any(name not in SUITE_CHOICES for name in names):
        raise argparse.ArgumentTypeError(f"--suites={text!r}: choose from "
                                         f"{','.join(SUITE_CHOICES)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m derta_jax.durability",
                                     description="ASR against harmful fine-tuning steps.")
    parser.add_argument("--model", required=True, help="HF model directory or full workdir")
    parser.add_argument("--attack", required=True,
                        help="JSONL of question + harmful_response rows to fine-tune on")
    parser.add_argument("--prompts", required=True, help="JSONL evaluation prompts")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int_list("steps", "steps", "0,5,10,20", distinct=True),
                        default=(0, 5, 10, 20),
                        help="attack steps K to evaluate (0: the model as given)")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=1e-4, help="constant learning rate")
    parser.add_argument("--batch_size", type=int, default=8, help="attack batch (sequences)")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--template", default="chat", choices=TEMPLATE_NAMES)
    parser.add_argument("--suites", type=_suites, default=("direct",),
                        help=f"evaluation suites, some of {','.join(SUITE_CHOICES)}")
    parser.add_argument("--prefill_depths", type=_depths, default=(10,))
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--eval_batch_size", type=int, default=16)
    parser.add_argument("--judge", default="keyword", choices=("keyword", "world"))
    parser.add_argument("--world", default=None, help="--judge=world: the world directory")
    parser.add_argument("--mesh", type=_mesh, default=_mesh("fsdp:-1"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objective", default="sft", choices=("sft", "constrained_sft"),
                        help="the fine-tune's loss: plain SFT, or the constrained objective "
                        "against the model as given")
    parser.add_argument("--response_field", default="harmful_response",
                        help="the --attack rows' answer field to fine-tune on")
    parser.add_argument("--overwrite", action="store_true")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from derta_jax import paths, workdir as wd
    from derta_jax.eval import durability
    from derta_jax.eval.attacks import REQUIRED_FIELDS, read_prompt_rows
    from derta_jax.train import cluster
    from derta_jax.train.loop import run as train

    for flag in ("lora_rank", "batch_size", "max_length", "max_new_tokens", "eval_batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag}={getattr(args, flag)}: must be >= 1")
    if args.judge == "world" and not args.world:
        raise ValueError("--judge=world needs --world=WORLD_DIR")
    if cluster.multi_process_reason() is not None:
        raise ValueError("durability runs as one process (its attack and evaluations write "
                         "from every process); start it on one host")
    if args.judge == "world" and not os.path.isfile(os.path.join(args.world, "world.json")):
        raise ValueError(f"--world={args.world}: no world.json there")
    attack_rows = read_prompt_rows(args.attack, ("question", args.response_field))
    required = sorted({field for suite in args.suites
                       for field in REQUIRED_FIELDS.get(suite, ("question",))})
    eval_rows = read_prompt_rows(args.prompts, required)  # before the attack, not after
    durability.check_disjoint(attack_rows, eval_rows)
    from_workdir = wd.is_workdir(args.model)
    if from_workdir and wd.read_lora_record(args.model) is not None:
        raise ValueError(f"--model={args.model}: a LoRA workdir; export it merged first "
                         f"(python -m derta_jax.export --workdir=... --out=HF_DIR)")
    out = paths.prepare_output_dir(args.out, args.overwrite,
                                   replaces=("attack", "eval", "report.json", "report.md",
                                             "durability.png"))
    attack_dir = out / "attack"
    attack_dir.mkdir()
    attack_file = str(attack_dir / durability.ATTACK_FILE)
    durability.write_attack_rows(attack_rows, attack_file, args.response_field)
    workdir = str(attack_dir / "workdir")
    if any(k > 0 for k in args.steps):
        train(durability.attack_config(
            workdir, args.model, attack_file, steps=args.steps, rank=args.lora_rank,
            alpha=args.lora_alpha, lr=args.lr, batch_size=args.batch_size,
            max_length=args.max_length, template=args.template, seed=args.seed,
            mesh=args.mesh, from_workdir=from_workdir, objective=args.objective))
    reports = {}
    for k in sorted(args.steps):
        model, step = (args.model, None) if k == 0 else (workdir, k)
        reports[k] = _evaluate(args, model, step, str(out / "eval" / f"k{k}"))
    settings = {"steps": sorted(args.steps), "lora_rank": args.lora_rank,
                "lora_alpha": args.lora_alpha, "lr": args.lr, "schedule": "constant",
                "batch_size": args.batch_size, "attack_rows": len(attack_rows),
                "suites": list(args.suites), "judge": args.judge,
                "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                "objective": args.objective, "response_field": args.response_field}
    return durability.write_summary(str(out), args.model, settings, reports)


def _evaluate(args: argparse.Namespace, model: str, step, out_dir: str) -> dict:
    """One K's evaluation on --prompts over --suites (the evaluate command's pieces)."""
    from derta_jax.data.templates import make_template
    from derta_jax.eval.attacks import REQUIRED_FIELDS, build_suite, read_prompt_rows
    from derta_jax.eval.judges import make_judge
    from derta_jax.eval.rank_prefill import rank_prefill_items
    from derta_jax.eval.report import write_report
    from derta_jax.eval.run import greedy_generator, judge_items, load_evaluated, stop_token_ids
    from derta_jax.train.mesh import make_mesh

    mesh = make_mesh(args.mesh)
    loaded, tokenizer = load_evaluated(model, step=step, mesh=mesh)
    template = make_template(args.template, tokenizer)
    items = []
    for suite in args.suites:
        if suite == "rank_prefill":
            rows = read_prompt_rows(args.prompts, REQUIRED_FIELDS[suite])
            items += rank_prefill_items(loaded.model, tokenizer, rows, template,
                                        depths=args.prefill_depths,
                                        eos_token_ids=stop_token_ids(loaded.config, tokenizer),
                                        mesh=mesh, batch_size=args.eval_batch_size)
            continue
        options = {"depths": args.prefill_depths} if suite == "prefill" else {}
        items += build_suite(suite, args.prompts, None if suite == "completion" else template,
                             tokenizer=tokenizer, **options)
    judge = (make_judge("world", directory=args.world, tokenizer=tokenizer)
             if args.judge == "world" else make_judge("keyword", tokenizer=tokenizer))
    generate = greedy_generator(loaded.model, tokenizer, max_new_tokens=args.max_new_tokens,
                                mesh=mesh, batch_size=args.eval_batch_size)
    rows = judge_items(items, generate, judge, tokenizer=tokenizer,
                       batch_size=args.eval_batch_size)
    name = model if step is None else f"{model} step {step}"
    return write_report(rows, out_dir, model=name, overwrite=True,
                        setup={"max_new_tokens": args.max_new_tokens, "decoding": "greedy"})


def main(argv: Sequence[str] | None = None) -> int:
    from derta_jax.train.config import ConfigError
    from derta_jax.train.loop import NonFiniteLossError

    args = parse_args(argv)
    try:
        summary = run(args)
    except (DataError, ValueError, OSError, ConfigError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    for point in summary["curve"]:
        suite = point["suite"] if point["k"] is None else f"{point['suite']} k={point['k']}"
        print(f"  K={point['steps']} {suite}: harmful {point['asr']['value']:.3f} "
              f"refused {point['refused']['value']:.3f} (n={point['n']})")
    return 0


def cli() -> None:
    """The console-script entry point (pyproject [project.scripts]), = python -m."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
