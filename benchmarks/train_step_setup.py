"""What benchmarks/train_step.py times: the two training steps and the batches they eat.

Why a separate module: the timing script must compare like with like, and that is a
matter of construction, not of timing. Here
  * one random `MistralForCausalLM` is built and its weights streamed into derta_jax
    through the HF name table, so both sides start from the same parameters;
  * the derta_jax step is the trainer's own (derta_jax.train.state.assemble: the step,
    optimiser and donation the trainer and the planner use), not a re-implementation;
  * the PyTorch step is what an HF user writes: forward to logits, cross-entropy on the
    supervised positions, backward, global-norm clipping, `torch.optim.AdamW` (decay on
    matrices only, like the HF Trainer and derta_jax's optimizer);
  * batches follow DESIGN.md's contract: a DeRTa batch (half the rows are harmful rows
    whose response positions are RTO positions targeting the refusal id) and its plain-SFT
    twin (same tokens and supervised positions, next-token targets, no RTO).
With rto_keep_rate 1.0 the DeRTa loss of a batch is exactly the PyTorch cross-entropy of its
targets over its loss_mask, which tests/test_benchmark_train_step.py checks step by step.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from derta_jax import loss as derta
from derta_jax import weights
from derta_jax.data.packing import pack_rows, pad_rows
from derta_jax.hf.config import model_config_from_hf
from derta_jax.hf.mapping import load_hf_tensors
from derta_jax.models.transformer import Transformer
from derta_jax.train import mesh as mesh_lib
from derta_jax.train.config import default_config
from derta_jax.train.state import assemble
from derta_jax.train.step import BATCH_KEYS, TrainState


@dataclasses.dataclass(frozen=True)
class BenchShape:
    """The benchmark's model and batch. Defaults: the issue's tiny Mistral, batch 8 x 256."""

    vocab: int = 4096
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 688
    batch: int = 8
    seq: int = 256


def optimizer_config(lr: float = 1e-4) -> ml_collections.ConfigDict:
    """The trainer's optimiser section with a constant learning rate (no warmup), so the
    PyTorch side can reproduce every update exactly."""
    optim = default_config().optim
    optim.lr, optim.schedule, optim.warmup_ratio = lr, "constant", 0.0
    return optim


# --- models -------------------------------------------------------------------------------


def build_models(shape: BenchShape, seed: int = 0, attention_impl: str = "xla"):
    """-> (HF MistralForCausalLM in train mode, derta_jax Transformer, its ModelConfig),
    both holding the same random float32 weights."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    hf_config = MistralConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                              intermediate_size=shape.intermediate,
                              num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                              num_key_value_heads=shape.kv_heads,
                              head_dim=shape.hidden // shape.heads, sliding_window=None,
                              tie_word_embeddings=False, attention_dropout=0.0)
    torch.manual_seed(seed)
    hf_model = MistralForCausalLM(hf_config).float().train()
    config = model_config_from_hf(hf_config.to_dict(), param_dtype="float32", dtype="float32",
                                  attention_impl=attention_impl)
    abstract = weights.abstract_model(config)
    tensors = ((name, t.detach().numpy(), "state_dict")
               for name, t in hf_model.state_dict().items())
    graphdef, _ = nnx.split(abstract)
    model = nnx.merge(graphdef, load_hf_tensors(abstract, tensors, config))
    return hf_model, model, config


# --- the derta_jax step ---------------------------------------------------------------------


def make_jax_step(model: Transformer, loss_cfg: derta.LossConfig,
                  optim: ml_collections.ConfigDict, seed: int = 0):
    """-> (jitted step(state, frozen, batch) -> (state, metrics) with the state donated,
    a function giving a fresh TrainState from the model's weights, frozen rest).

    The trainer's own step: derta_jax.train.state.assemble for a config holding this
    model, loss and optimiser; one micro-batch, one device."""
    config = default_config()
    config.seed = seed
    for name, value in dataclasses.asdict(model.config).items():
        if name == "rope_scaling":
            config.model.rope_scaling_json = json.dumps(value) if value else ""
        else:
            setattr(config.model, name, value)
    config.loss.update(dataclasses.asdict(loss_cfg.validate()))
    config.optim = optim
    config.train.update(batch_size=1, micro_batches=1)
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1},
                              devices=jax.devices()[:1])
    a = assemble(config, mesh, total_steps=1000, model_cfg=model.config)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def fresh_state() -> TrainState:
        copied = jax.tree.map(jnp.array, params)  # donation consumes it; keep the original
        return a.init_state(params=copied)

    return a.jitted, fresh_state, a.load_frozen()


def compile_step(jax_step, batch: dict):
    """make_jax_step's triple -> (the step AOT-compiled for `batch`'s shapes, fresh_state,
    frozen): one compile serves the timing and XLA's cost analysis (donation kept)."""
    step, fresh_state, frozen = jax_step
    return step.lower(fresh_state(), frozen, to_device(batch)).compile(), fresh_state, frozen


def xla_cost(compiled) -> dict:
    """XLA's own count for one compiled step (load-independent): {"flops", "bytes"}."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost["flops"]), "bytes": float(cost["bytes accessed"])}


def to_device(batch: dict) -> dict:
    return {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}


# --- the PyTorch step ----------------------------------------------------------------------


def make_torch_step(hf_model, optim: ml_collections.ConfigDict) -> Callable[[dict], object]:
    """-> step(torch batch) -> loss: forward, masked cross-entropy of `targets` over
    `loss_mask` (mean over supervised positions), backward, clipping, AdamW. The loss comes
    back as a detached tensor (no host sync inside the step)."""
    import torch

    decay = [p for p in hf_model.parameters() if p.ndim >= 2]
    no_decay = [p for p in hf_model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps)

    def step(batch: dict) -> float:
        logits = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=batch["positions"]).logits
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                                                reduction="none")
        mask = batch["loss_mask"].flatten()
        loss = (nll * mask).sum() / mask.sum().clamp(min=1)
        loss.backward()
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(hf_model.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def to_torch(batch: dict) -> dict:
    """Padding-mode batch -> the tensors HF needs (a packed batch has no HF equivalent here)."""
    import torch

    segments = np.asarray(batch["segment_ids"])
    if segments.max() > 1:
        raise ValueError("to_torch: batch['segment_ids'] holds packed rows; HF PyTorch gets "
                         "padding-mode batches only")
    return {"input_ids": torch.tensor(batch["input_ids"], dtype=torch.long),
            "attention_mask": torch.tensor(segments > 0, dtype=torch.long),
            "positions": torch.tensor(batch["positions"], dtype=torch.long),
            "targets": torch.tensor(batch["targets"], dtype=torch.long),
            "loss_mask": torch.tensor(batch["loss_mask"], dtype=torch.float32)}


# --- batches -------------------------------------------------------------------------------


def derta_and_sft_batches(shape: BenchShape, refusal_id: int, prompt_len: int,
                          seed: int = 0) -> tuple[dict, dict]:
    """(DeRTa batch, plain-SFT batch) of full-length rows with the same tokens.

    Every row is `prompt (prompt_len tokens) + response`; its supervised positions run from
    the last prompt token to the second-to-last token (DESIGN.md). In the DeRTa batch the
    odd rows are harmful: their supervised positions are RTO positions targeting
    `refusal_id`. In the SFT batch every supervised position targets the next token."""
    if not 1 <= prompt_len < shape.seq:
        raise ValueError(f"prompt_len={prompt_len}: must be in 1..seq-1={shape.seq - 1}")
    rng = np.random.default_rng(seed)
    b, t = shape.batch, shape.seq
    input_ids = rng.integers(3, shape.vocab, (b, t)).astype(np.int32)
    loss_mask = np.zeros((b, t), bool)
    loss_mask[:, prompt_len - 1: t - 1] = True
    next_tokens = np.zeros((b, t), np.int32)
    next_tokens[:, :-1] = input_ids[:, 1:]
    sft = {"input_ids": input_ids, "targets": np.where(loss_mask, next_tokens, 0).astype(np.int32),
           "loss_mask": loss_mask, "rto_mask": np.zeros((b, t), bool),
           "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
           "segment_ids": np.ones((b, t), np.int32)}
    harmful = (np.arange(b) % 2 == 1)[:, None]
    rto_mask = loss_mask & harmful
    derta_batch = dict(sft, rto_mask=rto_mask,
                       targets=np.where(rto_mask, refusal_id, sft["targets"]).astype(np.int32))
    return derta_batch, sft


def synthetic_world_rows(vocab: int, max_length: int, seed: int = 0) -> tuple[list[dict], int]:
    """Tokenized rows of the project's synthetic DeRTa mixture (safety + helpful rows of
    varied lengths) with a BPE tokenizer trained on the world; -> (rows, pad id)."""
    from derta_jax.data import formats, mixture, synthetic, templates, tokenize
    from derta_jax.data.tokenizer_builder import build_bpe_tokenizer

    world = synthetic.generate_world(seed)
    required = synthetic.single_token_strings()
    tokenizer = build_bpe_tokenizer(synthetic.training_texts(world), vocab_size=vocab - len(required),
                                    required_words=required)
    if len(tokenizer) > vocab:
        raise ValueError(f"synthetic_world_rows: the tokenizer has {len(tokenizer)} tokens, more "
                         f"than vocab={vocab}")
    template = templates.make_template("reference", tokenizer)
    triples = [formats.TripleRow(r["question"], r["safe_response"], r["harmful_response"],
                                 f"synthetic:triples:{i + 1}")
               for i, r in enumerate(world.rows["triples"])]
    helpful = [formats.HelpfulRow(r["instruction"], r["output"], f"synthetic:helpful:{i + 1}")
               for i, r in enumerate(world.rows["helpful"])]
    built = mixture.build_mixture(triples, helpful, "derta", seed, template,
                                  num_safety=2 * len(triples))
    # Rows whose prompt alone fills max_length cannot train anything: skipped (small seq).
    rows, _ = tokenize.tokenize_examples(built.examples, tokenizer,
                                         tokenize.refusal_token_id(tokenizer), max_length,
                                         on_error="skip")
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order], int(tokenizer.pad_token_id or 0)


def padded_and_packed_batches(rows: Sequence[dict], shape: BenchShape,
                              pad_id: int) -> tuple[list[dict], list[dict]]:
    """The same rows as [batch, seq] batches in padding mode and in packing mode (the last
    batch of each mode topped up with all-padding sequences)."""
    def batches(stacked: dict) -> list[dict]:
        n = stacked["input_ids"].shape[0]
        total = -(-n // shape.batch) * shape.batch
        filler = pad_rows([], shape.seq, pad_id)  # keys and dtypes of an empty batch
        out = []
        for start in range(0, total, shape.batch):
            part = {k: stacked[k][start:start + shape.batch] for k in BATCH_KEYS}
            missing = shape.batch - part["input_ids"].shape[0]
            if missing:
                part = {k: np.concatenate([v, np.zeros((missing, shape.seq), filler[k].dtype)])
                        for k, v in part.items()}
                part["input_ids"][-missing:] = pad_id
            out.append(part)
        return out

    padded = pad_rows(rows, shape.seq, pad_id)
    packed, _ = pack_rows(rows, shape.seq, pad_id)
    return batches(padded), batches(packed)


def useful_tokens(batch: dict) -> int:
    """Non-pad positions (segment id > 0): tokens the step actually learns from."""
    return int(np.count_nonzero(np.asarray(batch["segment_ids"])))
