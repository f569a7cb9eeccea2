"""Generate and judge evaluation items: the loop between attacks.py and report.py.

Why a module apart from the CLI: the loop (batches of prompts -> generations -> verdicts
-> judged rows) is the same for `python -m derta_jax.evaluate` and for the reproduction
script, and it is testable with any `generate_texts` function, no model needed.

    rows = judge_items(items, generate_texts, judge, tokenizer=tok, batch_size=16)
    model, tokenizer = load_model_and_tokenizer("HF_DIR_or_WORKDIR")
    generate_texts = greedy_generator(model, tokenizer, max_new_tokens=512)

Model loading (derta_jax.weights.load_model): an HF directory (config.json + safetensors)
or a derta_jax workdir (model_config.json + Orbax checkpoints, tokenizer in hf_files/; any
step, the latest by default; full or LoRA, whose adapters are merged into the base as
export merges them), local or remote (gs://bucket/run). The tokenizer is loaded with trust_remote_code=False. Prompts are encoded
here: a prompt whose text already starts with the BOS token (chat templates render it)
gets no second one; other prompts get the tokenizer's own special tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

from derta_jax.eval.judges import Judge
from derta_jax.eval.report import judged_row

# prompts are texts, or token ids where an item carries `prompt_ids` (eval/rank_prefill.py)
GenerateTexts = Callable[[Sequence[Union[str, Sequence[int]]]], list[str]]


def judge_items(items: Sequence[dict], generate_texts: GenerateTexts, judge: Judge, *,
                tokenizer: Any = None, batch_size: int = 16) -> list[dict]:
    """Judged rows for `items`, in item order, generated `batch_size` prompts at a time.

    Batches are formed from the prompts sorted by length (stable), so that a batch pads
    its rows to a similar length, not to the longest prompt of the file (prefill suites
    mix depths 0 to 40)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    order = sorted(range(len(items)), key=lambda i: len(items[i]["prompt"]))
    rows: list = [None] * len(items)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        generations = generate_texts([items[i].get("prompt_ids") or items[i]["prompt"]
                                      for i in batch])
        if len(generations) != len(batch):
            raise RuntimeError(f"generate_texts returned {len(generations)} texts for "
                               f"{len(batch)} prompts")
        if hasattr(judge, "prefetch"):  # a judge that scores a batch in one pass
            judge.prefetch([(items[i]["question"], items[i]["prefill"], generation)
                            for i, generation in zip(batch, generations)])
        for i, generation in zip(batch, generations):
            item = items[i]
            verdict = judge(item["question"], item["prefill"], generation, item_id=item["id"])
            rows[i] = judged_row(item, generation, verdict, judge=judge.name, tokenizer=tokenizer)
    return rows


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt, with exactly one BOS when the tokenizer uses one."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer.encode(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))


def stop_token_ids(config: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids of both the model config and the tokenizer (chat models end a
    turn with the tokenizer's EOS, e.g. <|im_end|>, which config.json may not name)."""
    ids = {getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)}
    return sorted(i for i in ids if i is not None)


# prompts are left-padded to a multiple of this many tokens: batches of nearby lengths
# then share one compiled decode program
PROMPT_WIDTH_MULTIPLE = 16


def greedy_generator(model: Any, tokenizer: Any, *, max_new_tokens: int = 512,
                     mesh: Any = None, batch_size: int = 0) -> GenerateTexts:
    """A GenerateTexts that decodes greedily with the project's KV-cache decoder (on
    `mesh` when given: the model's weights must already be placed on it). batch_size:
    judge_items' batch size; a shorter (last) batch is padded to it with dummy rows."""
    from derta_jax.models.decode import generate

    eos = stop_token_ids(model.config, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else None

    def generate_texts(prompts: Sequence[Union[str, Sequence[int]]]) -> list[str]:
        ids = [encode_prompt(tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
        out = generate(model, ids, tokenizer=tokenizer,
                       max_new_tokens=max_new_tokens, temperature=0.0, eos_token_ids=eos,
                       pad_id=pad, mesh=mesh, width_multiple=PROMPT_WIDTH_MULTIPLE,
                       min_rows=batch_size)
        return list(out.texts)

    return generate_texts


def load_evaluated(path: str, *, step: Optional[int] = None, base_hf_dir: Optional[str] = None,
                   mesh: Any = None, dtype: Optional[str] = None,
                   compute_dtype: Optional[str] = None,
                   scan_layers: Optional[bool] = None) -> tuple[Any, Any]:
    """(derta_jax.weights.LoadedModel, HF tokenizer) from an HF dir or a workdir (full or
    LoRA, any step; local or gs://), the weights on `mesh`'s shardings when given, in
    `dtype` (computing in `compute_dtype`) when given. The tokenizer is loaded with trust_remote_code=False, from a
    temporary local copy when the workdir is remote."""
    from transformers import AutoTokenizer

    from derta_jax import paths, weights

    loaded = weights.load_model(path, step=step, base_hf_dir=base_hf_dir, mesh=mesh, dtype=dtype,
                                compute_dtype=compute_dtype, scan_layers=scan_layers)
    with paths.fetched(loaded.tokenizer_dir) as local:
        tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=False)
    if paths.is_remote(loaded.tokenizer_dir):
        tokenizer.name_or_path = loaded.tokenizer_dir  # messages name it, not the deleted copy
    return loaded, tokenizer


def load_model_and_tokenizer(path: str, **options) -> tuple[Any, Any]:
    """(derta_jax Transformer with loaded weights, HF tokenizer): `load_evaluated`'s model."""
    loaded, tokenizer = load_evaluated(path, **options)
    return loaded.model, tokenizer
