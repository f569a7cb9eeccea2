"""Layers stacked and scanned vs one by one, for evaluate's --scan_layers (BENCHMARKS.md):
SmolLM2-135M-Instruct (30 layers) from its float32 HF directory, 1 CPU device, a batch of 8
chat prompts, 32 greedy tokens. One process per side (the layout is fixed at load), so run
the sides alternately: the first generate (compile + run) and the steady time per token
(mean of 3 more generates), wall and process CPU.

    for side in noscan scan noscan scan; do python -m benchmarks.scan_layers $side; done

Needs the SmolLM2 HF directory the tests write (tests/fixtures_hf.py, under
~/.cache/derta_jax/smollm2-*).
"""

from __future__ import annotations

import glob
import os
import sys
import time


def main(side: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    from transformers import AutoTokenizer

    from derta_jax import weights
    from derta_jax.models import decode

    found = glob.glob(os.path.expanduser("~/.cache/derta_jax/smollm2*"))
    if not found:
        sys.exit("no SmolLM2 HF directory under ~/.cache/derta_jax (run tests/test_models_parity.py once)")
    tokenizer = AutoTokenizer.from_pretrained(found[0])
    prompts = [tokenizer.encode("How do I bake bread at home? Tell me step by step.")] * 8
    scan = side == "scan"
    start, start_cpu = time.perf_counter(), time.process_time()
    model = weights.load_model(found[0], scan_layers=scan).model
    loaded = time.perf_counter()
    first = decode.generate(model, prompts, max_new_tokens=32, eos_token_ids=[], width_multiple=16)
    compiled, compiled_cpu = time.perf_counter(), time.process_time()
    for _ in range(3):
        again = decode.generate(model, prompts, max_new_tokens=32, eos_token_ids=[],
                                width_multiple=16)
    end, end_cpu = time.perf_counter(), time.process_time()
    print(f"scan={scan} load {loaded - start:.1f}s first generate (compile+run) "
          f"{compiled - loaded:.1f}s cpu {compiled_cpu - start_cpu:.1f}; steady "
          f"{(end - compiled) / 3 / 32 * 1000:.1f} ms/token wall, "
          f"{(end_cpu - compiled_cpu) / 3 / 32 * 1000:.1f} cpu; same={first.tokens == again.tokens}; "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "noscan")
