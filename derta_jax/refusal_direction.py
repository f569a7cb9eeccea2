"""Find a model's refusal direction (Arditi et al. 2024) for `evaluate --ablate_direction`.

    python -m derta_jax.refusal_direction --model=HF_DIR_or_WORKDIR --harmful=H.jsonl \\
        --harmless=B.jsonl --out=DIR [--step=N] [--base_hf_dir=DIR] [--template=chat]
        [--system=TEXT] [--validation_fraction=0.5]
        [--max_layer_fraction=0.8] [--batch_size=16] [--mesh=fsdp:-1] [--overwrite]

Why: a refusal that one direction of the residual stream carries is removed by projecting
that direction out of the weights, no fine-tuning needed (derta_jax/eval/
refusal_direction.py says how it is found and removed). Rows of --harmful and --harmless
need `question`, rendered in --template as the model is prompted. The last
--validation_fraction of the harmful rows choose the layer; the others, with every harmless
row, give the candidates. Writes DIR/direction.json (the chosen layer and direction, the
refusal score of every candidate layer and of the model as is); then

    python -m derta_jax.evaluate --model=... --ablate_direction=DIR/direction.json ...

measures the ablated model on any suite.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from derta_jax.arg_types import mesh_sizes
from derta_jax.data.formats import DataError
from derta_jax.data.templates import TEMPLATE_NAMES

DIRECTION_FILE = "direction.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m derta_jax.refusal_direction",
                                     description="The refusal direction of a model.")
    parser.add_argument("--model", required=True, help="HF model directory or workdir")
    parser.add_argument("--harmful", required=True, help="JSONL rows with question")
    parser.add_argument("--harmless", required=True, help="JSONL rows with question")
    parser.add_argument("--out", required=True)
    parser.add_argument("--step", type=int, default=None, help="workdir step (default: latest)")
    parser.add_argument("--base_hf_dir", default=None,
                        help="LoRA workdirs: the base model's HF dir (default: lora.json's)")
    parser.add_argument("--template", default="chat", choices=TEMPLATE_NAMES)
    parser.add_argument("--system", default=None,
                        help="system prompt (chat template), as evaluate will be given")
    parser.add_argument("--validation_fraction", type=float, default=0.5)
    parser.add_argument("--max_layer_fraction", type=float, default=0.8)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--mesh", type=mesh_sizes, default=mesh_sizes("fsdp:-1"))
    parser.add_argument("--overwrite", action="store_true")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from derta_jax import paths
    from derta_jax.data.templates import make_template
    from derta_jax.eval.attacks import read_prompt_rows
    from derta_jax.eval.rank_prefill import refusal_opening_ids
    from derta_jax.eval.refusal_direction import find_direction
    from derta_jax.eval.run import encode_prompt, load_evaluated
    from derta_jax.train.mesh import make_mesh

    if not 0 < args.validation_fraction < 1 or not 0 < args.max_layer_fraction <= 1:
        raise ValueError("--validation_fraction must be in (0, 1), --max_layer_fraction in (0, 1]")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size={args.batch_size}: must be >= 1")
    harmful, harmless = read_prompt_rows(args.harmful), read_prompt_rows(args.harmless)
    held = max(1, round(args.validation_fraction * len(harmful)))
    if held >= len(harmful):
        raise ValueError(f"--harmful={args.harmful}: {len(harmful)} rows leave none for the "
                         f"direction after {held} validation rows; give more rows")
    paths.check_output_dir(args.out, args.overwrite)
    mesh = make_mesh(args.mesh)
    loaded, tokenizer = load_evaluated(args.model, step=args.step, base_hf_dir=args.base_hf_dir,
                                       mesh=mesh)
    template = make_template(args.template, tokenizer, system=args.system)

    def encoded(rows):
        return [encode_prompt(tokenizer, template.render(row["question"])) for _, row in rows]

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    found = find_direction(loaded.model, encoded(harmful[:-held]), encoded(harmless),
                           encoded(harmful[-held:]),
                           refusal_opening_ids(tokenizer, vocab_size=loaded.config.vocab_size),
                           max_layer_fraction=args.max_layer_fraction, mesh=mesh,
                           batch_size=args.batch_size, pad_id=pad)
    record = {"model": args.model, "step": loaded.step, "template": args.template,
              "system": args.system, "harmful": args.harmful,
              "harmless": args.harmless, "num_harmful": len(harmful) - held,
              "num_harmless": len(harmless), "num_validation": held, **found}
    out = paths.prepare_output_dir(args.out, args.overwrite, replaces=(DIRECTION_FILE,))
    (out / DIRECTION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        record = run(args)
    except (DataError, ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/{DIRECTION_FILE}: layer {record['layer']} of "
          f"{record['layers_considered']} considered; refusal score "
          f"{record['baseline_score']:.3f} -> {record['scores'][record['layer']]:.3f} ablated")
    return 0


def cli() -> None:
    """The console-script entry point (pyproject [project.scripts]), = python -m."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
