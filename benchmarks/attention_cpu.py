"""One attention layer on CPU: derta_jax's path against PyTorch's scaled_dot_product_attention.

Why: the model forward is 0.93x PyTorch at seq 64 but 0.64x at seq 1024 (BENCHMARKS.md), so
the gap grows with T^2: attention. This times the attention alone, same inputs, interleaved
(benchmarks/timing.py):
  ours        the model's path: attention_mask (segments + causal, [B,1,T,S]) and
              jax.nn.dot_product_attention(implementation="xla")
  causal_only jax.nn.dot_product_attention(is_causal=True), no explicit mask
  grouped     a plain einsum softmax with GQA as a reshape (no repeated KV heads)
  chunked     the model's attention_impl="chunked" (models/attention.chunked_attention)
  cpu_flash   the model's attention_impl="cpu_flash", the C++ kernel (models/cpu_flash.py),
              CPU's default where it builds
  torch_sdpa  torch.nn.functional.scaled_dot_product_attention(is_causal=True)
and the gradient (of the sum of squares) of ours, chunked, cpu_flash and torch_sdpa.

    python -m benchmarks.attention_cpu [--batch 2 --seq 1024 --heads 8 --kv_heads 4 --head_dim 32]
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.timing import (cores, interleaved_samples, load1, load_average, loaded,
                               loaded_line, ratio_cell)
from derta_jax.models.attention import (_dot_product_attention, attention_mask,
                                        chunked_attention)
from derta_jax.models.cpu_flash import cpu_flash_attention


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in (("batch", 2), ("seq", 1024), ("heads", 8), ("kv_heads", 4),
                        ("head_dim", 32), ("repeats", 7)):
        p.add_argument(f"--{name}", type=int, default=value)
    a = p.parse_args(argv)
    B, T, N, K, H = a.batch, a.seq, a.heads, a.kv_heads, a.head_dim
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, T, N, H), np.float32)
    k = rng.standard_normal((B, T, K, H), np.float32)
    v = rng.standard_normal((B, T, K, H), np.float32)
    segments = np.ones((B, T), np.int32)

    @jax.jit
    def ours(q, k, v, segments):
        mask = attention_mask(segments, segments, jnp.arange(T), jnp.arange(T), None)
        return _dot_product_attention(q, k, v, mask, "xla", None)

    @jax.jit
    def causal_only(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    @jax.jit
    def grouped(q, k, v):
        qg = q.reshape(B, T, K, N // K, H)
        scores = jnp.einsum("btkgh,bskh->bkgts", qg, k) / np.sqrt(H)
        causal = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
        probs = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
        return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, N, H)

    @jax.jit
    def chunked(q, k, v, segments):
        return chunked_attention(q, k, v, segments, None)

    @jax.jit
    def cpu_flash(q, k, v, segments):
        return cpu_flash_attention(q, k, v, segments, None)

    def gradient(f, *extra):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, *extra) ** 2),
                                argnums=(0, 1, 2)))

    grad_ours, grad_chunked, grad_cpu_flash = (gradient(f, jnp.asarray(segments))
                                               for f in (ours, chunked, cpu_flash))

    tq, tk, tv = (torch.tensor(x).transpose(1, 2) for x in (q, k, v))
    tk, tv = tk.repeat_interleave(N // K, 1), tv.repeat_interleave(N // K, 1)

    def torch_sdpa():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

    leaves = [x.clone().requires_grad_(True) for x in (tq, tk, tv)]

    def torch_sdpa_grad():
        for leaf in leaves:
            leaf.grad = None
        out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)
        (out ** 2).sum().backward()
        return [leaf.grad for leaf in leaves]

    jq, jk, jv, js = (jnp.asarray(x) for x in (q, k, v, segments))
    fns = {"ours": lambda: ours(jq, jk, jv, js).block_until_ready(),
           "causal_only": lambda: causal_only(jq, jk, jv).block_until_ready(),
           "grouped": lambda: grouped(jq, jk, jv).block_until_ready(),
           "chunked": lambda: chunked(jq, jk, jv, js).block_until_ready(),
           "cpu_flash": lambda: cpu_flash(jq, jk, jv, js).block_until_ready(),
           "torch_sdpa": torch_sdpa,
           "grad ours": lambda: jax.block_until_ready(grad_ours(jq, jk, jv)),
           "grad chunked": lambda: jax.block_until_ready(grad_chunked(jq, jk, jv)),
           "grad cpu_flash": lambda: jax.block_until_ready(grad_cpu_flash(jq, jk, jv)),
           "grad torch_sdpa": torch_sdpa_grad}
    reference = torch_sdpa().transpose(1, 2).numpy()
    outs = {"ours": ours(jq, jk, jv, js), "causal_only": causal_only(jq, jk, jv),
            "grouped": grouped(jq, jk, jv), "chunked": chunked(jq, jk, jv, js),
            "cpu_flash": cpu_flash(jq, jk, jv, js)}
    for name, out in outs.items():
        assert np.abs(np.asarray(out) - reference).max() < 1e-4, name
    torch_dq = torch_sdpa_grad()[0].transpose(1, 2).numpy()
    assert np.abs(np.asarray(grad_cpu_flash(jq, jk, jv)[0]) - torch_dq).max() < 1e-3
    info = {"cores": cores(), "load_before": load_average(), "load1_before": load1()}
    wall, cpu = interleaved_samples(fns, a.repeats)
    info.update(load_after=load_average(), load1_after=load1())
    flops = 4 * B * N * T * T * H
    print(f"attention B={B} T={T} heads={N} kv={K} head_dim={H} float32, causal; "
          f"{a.repeats} interleaved repetitions; load before {info['load_before']}, "
          f"after {info['load_after']}; torch {torch.get_num_threads()} threads")
    for line in loaded_line(info):
        print(line)
    torch_wall = statistics.median(wall["torch_sdpa"])
    torch_grad_wall = statistics.median(wall["grad torch_sdpa"])
    for name in fns:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        if name.startswith("grad"):
            print(f"{name:15s} {w * 1e3:7.1f} ms wall {c * 1e3:7.1f} ms CPU  vs torch "
                  f"{ratio_cell(torch_grad_wall / w, loaded(info), bold=False)}")
            continue
        print(f"{name:15s} {w * 1e3:7.1f} ms wall {c * 1e3:7.1f} ms CPU  "
              f"{flops / w / 1e9:5.1f} GFLOP/s (dense count)  vs torch "
              f"{ratio_cell(torch_wall / w, loaded(info), bold=False)}")


if __name__ == "__main__":
    main()
