"""Evaluate a model on one suite: generate, judge, write a report.

    python -m derta_jax.evaluate --model=HF_DIR_or_WORKDIR [--step=N] --suite=SUITE \\
        --prompts=FILE.jsonl --judge=keyword --out=DIR [--template=chat|reference|plain] [--max_new_tokens=512]
        [--prefill_depths=0,5,10,20,40] [--prefill_unit=tokens|words] [--rank_k=20]
        [--batch_size=16]
        [--judge_model=GUARD_DIR --guard_format=llama_guard|harmbench]
        [--judge_placement=auto|host|mesh] [--labels=FILE]
        [--world=WORLD_DIR] [--refusal_probe [--refusal_string=WORD]]
        [--limit=N] [--name=MODEL_NAME] [--overwrite]
        [--mesh=fsdp:-1] [--dtype=float32|bfloat16] [--compute_dtype=float32|bfloat16]
        [--scan_layers] [--ablate_direction=DIR/direction.json]
        [--distributed=auto|always|never --coordinator_address=HOST:PORT
         --num_processes=N --process_id=I]

Why: one command from a checkpoint to evidence (generations.jsonl, report.json,
report.md, plots; derta_jax/eval/report.py). Greedy decoding (the paper's setting) with the
project's KV-cache decoder; suites and prompt formats in derta_jax/eval/attacks.py; judges in
derta_jax/eval/judges.py (keyword, the default; world, for prompts of a synthetic world, with
--world=WORLD_DIR; classifier, a local guard model; labels, human labels). The same inputs
give the same files. An existing non-empty --out is refused unless --overwrite. Bad prompt
rows are reported as FILE:LINE: field: problem with exit status 2.

The model is evaluated on a device mesh, as training runs (--mesh, default fsdp over every
device): its weights go straight onto the trainer's shardings, the prompts of a batch and
the KV cache are split over the batch axes (data, fsdp) and kv heads over tensor.
Decoding is one compiled loop per batch; batches group prompts of similar length. A
guard-model judge (--judge=classifier) runs on the host, or for a large guard on the same
mesh, one batched forward pass per generated batch (--judge_placement).

--suite=rank_prefill: rank-assisted prefilling (eval/rank_prefill.py; arXiv 2512.05518):
at each of the first k tokens of the row's harmful_response (k of --prefill_depths), the
reference token is fed when the model ranks it in its top --rank_k, else the model's
best-ranked token that opens no refusal; then the model answers greedily. A refusal that
holds against --suite=prefill but not here is deep in probability, not in rank.

--refusal_probe: DeRTa's depth measure next to the attacks. For every prompt row (each
needs harmful_response), P(refusal word next) at every position of the harmful answer,
teacher forced in the training format (--template), in batched forward passes on the mesh
(eval/refusal_probability.py): refusal_probabilities.jsonl, refusal_probability.png and
the mean over the answers' later half in the reports. The word is --refusal_string, else
the one the workdir's run trained with (data.refusal_string), else "Sorry".

Several processes (a multi-host slice, one process per host; started as training is, by
--distributed, default auto): every process reads the prompts and runs the same batches,
placing only its own devices' rows (models/sharding.put_global); the generated tokens are
gathered so that every process judges every row alike, and process 0 writes the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from derta_jax.arg_types import mesh_sizes as _mesh, prefill_depths as _depths
from derta_jax.data.formats import DataError
from derta_jax.data.templates import TEMPLATE_NAMES, make_template
from derta_jax.eval.attacks import DEFAULT_PREFILL_DEPTHS, PREFILL_UNITS, SUITES, build_suite
from derta_jax.eval.judges import JUDGE_NAMES, make_judge
from derta_jax.eval.rank_prefill import DEFAULT_RANK_K
from derta_jax.train.cluster import INITIALIZE_MODES


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m derta_jax.evaluate", description=__doc__.split("\n\n")[2])
    parser.add_argument("--model", required=True,
                        help="HF model directory or derta_jax workdir (full or LoRA; local or gs://)")
    parser.add_argument("--step", type=int, default=None,
                        help="workdir checkpoint step (default: the latest)")
    parser.add_argument("--base_hf_dir", default=None,
                        help="LoRA workdirs: the base model's HF dir (default: the one in lora.json)")
    parser.add_argument("--suite", required=True, choices=SUITES)
    parser.add_argument("--prompts", required=True, help="JSONL prompt file")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--judge", default="keyword", choices=JUDGE_NAMES)
    parser.add_argument("--judge_model", help="guard model directory (--judge=classifier)")
    parser.add_argument("--guard_format", default="llama_guard", choices=("llama_guard", "harmbench"))
    parser.add_argument("--guard_threshold", type=float, default=0.5)
    parser.add_argument("--judge_placement", default="auto", choices=("auto", "host", "mesh"),
                        help="--judge=classifier: run the guard on the host (transformers) or "
                             "on --mesh (derta_jax, batched); auto: the mesh for a guard over "
                             "4 GiB of weights")
    parser.add_argument("--labels", help="human labels JSONL (--judge=labels)")
    parser.add_argument("--world", help="synthetic world directory, written by "
                                        "derta_jax.data.synthetic (--judge=world)")
    parser.add_argument("--refusal_probe", action="store_true",
                        help="also probe P(refusal word) along each row's harmful_response")
    parser.add_argument("--refusal_string", default=None,
                        help="--refusal_probe's word, one token (default: the run's "
                             "data.refusal_string, else Sorry)")
    parser.add_argument("--template", default="chat", choices=TEMPLATE_NAMES)
    parser.add_argument("--system", default=None, help="system prompt (chat template)")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--prefill_depths", type=_depths, default=DEFAULT_PREFILL_DEPTHS)
    parser.add_argument("--prefill_unit", default="tokens", choices=PREFILL_UNITS)
    parser.add_argument("--rank_k", type=int, default=DEFAULT_RANK_K,
                        help="--suite=rank_prefill: the reference token is fed only when it "
                             "ranks in the model's top k, else the best top-k token that "
                             "opens no refusal (arXiv 2512.05518 uses 20)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N prompts (0: all)")
    parser.add_argument("--name", default=None, help="model name in the report (default: --model)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--mesh", type=_mesh, default=_mesh("fsdp:-1"),
                        help="device mesh as AXIS:SIZE,... over data, fsdp, tensor, expert "
                             "(-1: every remaining device), e.g. fsdp:8 or "
                             "data:2,fsdp:2,tensor:2 (default fsdp:-1)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="parameters in this dtype (default: as stored)")
    parser.add_argument("--compute_dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="activations in this dtype (default: --dtype). SmolLM2-135M, "
                             "first 32 greedy tokens: bfloat16 weights + float32 compute emit "
                             "float32's tokens; with bfloat16 compute each next-token choice "
                             "along float32's text agrees, free-running rows drift (78-91%% "
                             "of tokens)")
    parser.add_argument("--ablate_direction", default=None,
                        help="direction.json of python -m derta_jax.refusal_direction: "
                             "evaluate the model with that direction projected out of every "
                             "weight that writes to the residual stream")
    parser.add_argument("--scan_layers", action="store_true",
                        help="an HF directory's layers stacked and scanned: one layer body "
                             "to compile (SmolLM2-135M on CPU: the first generate 2.4x faster, "
                             "then ~25%% more CPU per token; BENCHMARKS.md); for deep models "
                             "and short runs. A workdir keeps its own layout")
    parser.add_argument("--distributed", default="auto", choices=INITIALIZE_MODES,
                        help="start the multi-process runtime (jax.distributed.initialize): "
                             "auto = when the launch has several processes (SLURM, TPU pod, "
                             "Open MPI, JAX_COORDINATOR_ADDRESS) or --coordinator_address is set")
    parser.add_argument("--coordinator_address", default="",
                        help="HOST:PORT of process 0 (with --num_processes, --process_id)")
    parser.add_argument("--num_processes", type=int, default=0)
    parser.add_argument("--process_id", type=int, default=-1)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Argument errors, found before the (slow) model load."""
    for flag, low in (("max_new_tokens", 1), ("batch_size", 1), ("rank_k", 1), ("limit", 0)):
        if getattr(args, flag) < low:
            raise ValueError(f"--{flag}={getattr(args, flag)}: must be >= {low}")
    if args.coordinator_address and not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--coordinator_address needs --num_processes >= 1 and --process_id "
                         f"in 0..num_processes-1, got --num_processes={args.num_processes} "
                         f"--process_id={args.process_id}")
    if (args.num_processes or args.process_id != -1) and not args.coordinator_address:
        raise ValueError("--num_processes and --process_id go with --coordinator_address "
                         "(without it, --distributed=auto finds the cluster itself)")
    if args.suite == "rank_prefill" and args.prefill_unit != "tokens":
        raise ValueError("--suite=rank_prefill feeds tokens: --prefill_unit=words does not apply")
    if args.judge == "classifier" and not args.judge_model:
        raise ValueError("--judge=classifier needs --judge_model=GUARD_DIR")
    if args.judge == "labels" and not args.labels:
        raise ValueError("--judge=labels needs --labels=FILE.jsonl")
    if args.judge == "world" and not args.world:
        raise ValueError("--judge=world needs --world=WORLD_DIR")
    if args.judge == "world" and not os.path.isfile(os.path.join(args.world, "world.json")):
        raise ValueError(f"--world={args.world}: no world.json there; expected a directory "
                         f"written by derta_jax.data.synthetic")


def _judge(args: argparse.Namespace, tokenizer, mesh=None):
    """The judge named by --judge (every name of JUDGE_NAMES, each explicitly)."""
    if args.judge == "keyword":
        return make_judge("keyword", tokenizer=tokenizer)
    if args.judge == "world":
        return make_judge("world", directory=args.world, tokenizer=tokenizer)
    if args.judge == "classifier":
        return make_judge("classifier", directory=args.judge_model,
                          prompt_format=args.guard_format, threshold=args.guard_threshold,
                          mesh=mesh, placement=args.judge_placement)
    if args.judge == "labels":
        return make_judge("labels", path=args.labels)
    raise ValueError(f"--judge={args.judge!r}: must be one of {', '.join(JUDGE_NAMES)}")


def read_direction(path: str) -> dict:
    """--ablate_direction's file: {"layer", "direction": [D floats], ...}."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"--ablate_direction={path}: not JSON ({err})") from None
    direction = record.get("direction") if isinstance(record, dict) else None
    if (not isinstance(direction, list) or not direction
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in direction)
            or not isinstance(record.get("layer"), int)):
        raise ValueError(f"--ablate_direction={path}: expected a layer (an integer) and a "
                         f"direction (a list of numbers), as python -m "
                         f"derta_jax.refusal_direction writes")
    return record


def _items(args: argparse.Namespace, loaded, tokenizer, template, mesh) -> list[dict]:
    """The suite's items, the first --limit prompt rows of them."""
    if args.suite == "rank_prefill":  # the model chooses the prefill
        from derta_jax.eval.attacks import REQUIRED_FIELDS, read_prompt_rows
        from derta_jax.eval.rank_prefill import rank_prefill_items
        from derta_jax.eval.run import stop_token_ids

        rows = read_prompt_rows(args.prompts, REQUIRED_FIELDS["rank_prefill"])
        return rank_prefill_items(loaded.model, tokenizer, rows[:args.limit or None], template,
                                  depths=args.prefill_depths, rank_k=args.rank_k,
                                  eos_token_ids=stop_token_ids(loaded.config, tokenizer),
                                  mesh=mesh, batch_size=args.batch_size)
    options = ({"depths": args.prefill_depths, "unit": args.prefill_unit}
               if args.suite == "prefill" else {})
    items = build_suite(args.suite, args.prompts, template, tokenizer=tokenizer, **options)
    return first_prompts(items, args.limit) if args.limit else items


def refusal_probe(args: argparse.Namespace, loaded, tokenizer, rows, mesh) -> dict:
    """write_report's refusal_probe: P(refusal word) along every row's harmful_response."""
    from derta_jax.data.tokenize import DEFAULT_REFUSAL
    from derta_jax.eval.refusal_probability import refusal_probabilities_along_answers

    word = args.refusal_string or loaded.run.refusal_string or DEFAULT_REFUSAL
    origin = ("--refusal_string" if args.refusal_string else
              f"{args.model}: data.refusal_string" if loaded.run.refusal_string else
              "--refusal_probe: the default refusal string")
    template = make_template(args.template, tokenizer, system=args.system)
    pairs = [(row["question"], row["harmful_response"]) for _, row in rows]
    try:
        probabilities = refusal_probabilities_along_answers(
            loaded.model, tokenizer, template, pairs, refusal=word, mesh=mesh,
            batch_size=args.batch_size)
    except ValueError as err:
        raise ValueError(f"{origin}={word!r}: {err}") from None
    return {"refusal": word, "rows": [
        {"source": source, "question": row["question"], "p_refusal": p,
         **({"held_out": row["held_out"]} if isinstance(row.get("held_out"), bool) else {})}
        for (source, row), p in zip(rows, probabilities)]}


def first_prompts(items: Sequence[dict], limit: int) -> list[dict]:
    """The items of the first `limit` prompt rows (all prefill depths of each row)."""
    kept: list[str] = []
    for item in items:
        source = item["meta"]["source"]
        if source not in kept:
            kept.append(source)
    chosen = set(kept[:limit])
    return [item for item in items if item["meta"]["source"] in chosen]


# what the summary printed after a run shows per group: the three outcomes (harmful is the
# ASR) and the degenerate share side by side, then the GCG convention, the refusal rate (the
# over-refusal rate on benign look-alikes) and accuracy
SUMMARY_SHOWN = (("refused", "outcome_refused"), ("harmful(ASR)", "outcome_harmful"),
                 ("neither", "outcome_neither"), ("degenerate", "degenerate"),
                 ("ASR(not refused, GCG)", "asr_not_refused"), ("refusal rate", "refusal_rate"),
                 ("accuracy", "accuracy"))


def _group_label(group: dict) -> str:
    return group["suite"] if group["k"] is None else f"{group['suite']} k={group['k']}"


def run(args: argparse.Namespace) -> dict:
    import jax

    from derta_jax.eval.attacks import read_prompt_rows
    from derta_jax.eval.report import build_report, write_report
    from derta_jax.eval.run import greedy_generator, judge_items, load_evaluated
    from derta_jax.models.sharding import batch_shards
    from derta_jax.paths import check_output_dir
    from derta_jax.train.cluster import initialize_distributed
    from derta_jax.train.mesh import make_mesh

    check_args(args)
    check_output_dir(args.out, args.overwrite)  # before the slow part
    probe_rows = (read_prompt_rows(args.prompts, required=("question", "harmful_response"))
                  if args.refusal_probe else None)
    ablated = read_direction(args.ablate_direction) if args.ablate_direction else None
    try:
        initialize_distributed(args.distributed, coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id,
                               flag="--distributed")
    except RuntimeError as err:  # the runtime could not start: the flags' to fix
        raise ValueError(f"--distributed={args.distributed}: {err}") from None
    try:
        mesh = make_mesh(args.mesh)
    except ValueError as err:  # the config's wording (mesh.fsdp=...) names the flag here
        raise ValueError(f"--mesh: {err}") from None
    loaded, tokenizer = load_evaluated(args.model, step=args.step, base_hf_dir=args.base_hf_dir,
                                       mesh=mesh, dtype=args.dtype,
                                       compute_dtype=args.compute_dtype,
                                       scan_layers=args.scan_layers or None)
    model = loaded.model
    if ablated is not None:
        from derta_jax.eval.refusal_direction import orthogonalized

        if len(ablated["direction"]) != loaded.config.hidden_size:
            raise ValueError(f"--ablate_direction={args.ablate_direction}: a direction of "
                             f"{len(ablated['direction'])} numbers for a model of hidden size "
                             f"{loaded.config.hidden_size}")
        if not 0 <= ablated["layer"] < loaded.config.num_layers:
            raise ValueError(f"--ablate_direction={args.ablate_direction}: layer "
                             f"{ablated['layer']} is out of range for a model of "
                             f"{loaded.config.num_layers} layers (another model's direction?)")
        model = loaded.model = orthogonalized(model, ablated["direction"])
    template = None if args.suite == "completion" else make_template(
        args.template, tokenizer, system=args.system)
    items = _items(args, loaded, tokenizer, template, mesh)
    shards = batch_shards(mesh)
    if args.batch_size % shards and jax.process_index() == 0:
        print(f"note: --batch_size={args.batch_size} is padded to {-(-args.batch_size // shards) * shards} "
              f"rows per batch (dummy rows), a multiple of the mesh's {shards} batch shards "
              f"(data x fsdp)", file=sys.stderr)
    judge = _judge(args, tokenizer, mesh)
    generator = greedy_generator(model, tokenizer, max_new_tokens=args.max_new_tokens, mesh=mesh,
                                 batch_size=args.batch_size)
    rows = judge_items(items, generator, judge, tokenizer=tokenizer, batch_size=args.batch_size)
    probe = None if probe_rows is None else refusal_probe(
        args, loaded, tokenizer, probe_rows[:args.limit or None], mesh)
    setup = {"param_dtype": loaded.config.param_dtype, "dtype": loaded.config.dtype,
             "max_new_tokens": args.max_new_tokens,
             "decoding": "greedy",
             "mesh": ",".join(f"{axis}:{size}" for axis, size in mesh.shape.items()),
             "processes": jax.process_count()}
    if ablated is not None:
        setup["ablated_direction"] = f"{args.ablate_direction} (layer {ablated['layer']})"
    name = args.name or args.model
    if jax.process_index() != 0:  # process 0 writes; the others wait until it has
        report = build_report(rows, model=name, setup=setup, refusal_probe=probe)
    else:
        report = write_report(rows, args.out, model=name, overwrite=args.overwrite, setup=setup,
                              refusal_probe=probe)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("evaluate: report written")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (DataError, ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    if jax.process_index() != 0:
        return 0
    print(f"wrote {args.out}: {report['n']} generations, judge {', '.join(report['judges'])}")
    for group in report["groups"]:
        if group["held_out"] is None:
            print(f"  {_group_label(group)}: n={group['n']}" + "".join(
                f" {label}={group[key]['value']:.3f}" for label, key in SUMMARY_SHOWN
                if group.get(key)))
    return 0


def cli() -> None:
    """The console-script entry point (pyproject [project.scripts]), = python -m."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
