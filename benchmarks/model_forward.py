"""Forward throughput of the derta_jax decoder against Hugging Face PyTorch, same weights.

Why: the issue asks for forward tokens/s of the JAX model next to transformers' on the
same small config on CPU, measured side by side. One random LlamaForCausalLM is built,
its state dict streamed into derta_jax through the HF name table, and both compute
logits for the same padded batch (their outputs are checked to agree first, so the
two sides do the same work).

    python -m benchmarks.model_forward [--layers 4 --hidden 256 --batch 8 --seq 256 --repeats 5]

Timed as every comparison here is (benchmarks/timing.py): interleaved, wall and CPU
medians, no headline ratio when the machine was loaded.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from benchmarks.timing import (cores, interleaved_samples, load1, load_average, loaded,
                               loaded_line, ratio_cell)
from derta_jax.hf.mapping import load_hf_tensors
from derta_jax.models.config import ModelConfig
from derta_jax.models.transformer import Transformer


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                            intermediate_size=args.hidden * 4, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, num_key_value_heads=args.heads // 2,
                            head_dim=args.hidden // args.heads, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(hf_config).eval()
    config = ModelConfig(family="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.hidden * 4, num_layers=args.layers,
                         num_heads=args.heads, num_kv_heads=args.heads // 2,
                         head_dim=args.hidden // args.heads, rms_norm_eps=hf_config.rms_norm_eps,
                         scan_layers=args.scan)
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    tensors = ((name, t.detach().numpy(), "state_dict") for name, t in hf_model.state_dict().items())
    graphdef, _ = nnx.split(abstract)
    return hf_model, nnx.merge(graphdef, load_hf_tensors(abstract, tensors, config))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scan", action="store_true", help="scanned layers on the JAX side")
    args = parser.parse_args()

    hf_model, model = build(args)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, (args.batch, args.seq))
    mask = np.ones_like(ids, dtype=bool)
    mask[1, : args.seq // 4] = False  # one left-padded row, as in evaluation batches
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)

    forward = nnx.jit(lambda m, i, p, s: m.logits(m(i, p, s)[0]))
    j_ids, j_pos, j_seg = (jnp.asarray(a, jnp.int32) for a in (ids, positions, mask))
    t_ids, t_mask, t_pos = torch.tensor(ids), torch.tensor(mask.astype(np.int64)), torch.tensor(positions)

    def run_jax():
        return forward(model, j_ids, j_pos, j_seg).block_until_ready()

    def run_torch():
        with torch.no_grad():
            return hf_model(input_ids=t_ids, attention_mask=t_mask, position_ids=t_pos).logits

    diff = np.abs(np.asarray(run_jax()) - run_torch().numpy())[mask].max()
    tokens = args.batch * args.seq
    info = {"cores": cores(), "load_before": load_average(), "load1_before": load1()}
    wall, cpu = interleaved_samples({"jax": run_jax, "torch": run_torch}, args.repeats)
    info.update(load_after=load_average(), load1_after=load1())
    wall = {k: statistics.median(v) for k, v in wall.items()}
    cpu = {k: statistics.median(v) for k, v in cpu.items()}
    hold = loaded(info)
    print(f"config: {args.layers} layers, hidden {args.hidden}, {args.heads} heads "
          f"({args.heads // 2} kv), vocab {args.vocab}; batch {args.batch} x {args.seq} tokens; "
          f"jax {jax.__version__} ({jax.devices()[0].platform}, scan={args.scan}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"load average (1/5/15 min): before {info['load_before']}, after {info['load_after']}; "
          f"{args.repeats} interleaved repetitions, medians")
    for line in loaded_line(info):
        print(line)
    print(f"max |logits diff| = {diff:.2e}")
    for name, label in (("jax", "derta_jax (jit, float32)  "), ("torch", "HF PyTorch (eager, float32)")):
        print(f"{label}: {tokens / wall[name]:10.0f} tokens/s  ({wall[name] * 1e3:.1f} ms/batch "
              f"wall, {cpu[name] * 1e3:.1f} ms CPU)")
    print(f"derta_jax / PyTorch: {ratio_cell(wall['torch'] / wall['jax'], hold)} wall, "
          f"{ratio_cell(cpu['torch'] / cpu['jax'], hold, bold=False)} CPU")


if __name__ == "__main__":
    main()
