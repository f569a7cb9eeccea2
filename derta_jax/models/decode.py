"""Text generation with a KV cache: prefill once, then one token per step.

Why: evaluation (attack success rates, helpfulness, refusal positions) generates many
responses; recomputing the prefix every step is quadratic, a cache is linear. The paper
decodes greedily; temperature / top-p sampling is there for ablations.

Batching: prompts are LEFT padded to a common length, so every row's next token is
written at the same cache slot. Padding gets segment id 0 (attends nowhere real and is
never attended to) and real tokens get RoPE positions 0, 1, ... from their own first
token, so a padded row computes what it would compute alone. Rows that finish early
(EOS or a stop string) keep stepping with their output ignored.

Decoding is one compiled `lax.while_loop` per call (not one jitted call per token): it
stops when every row has ended, and the host only looks at the tokens between calls
(stop strings need the text). On a mesh the rows and the KV cache are split like a
training batch (`mesh`), the weights as training places them.

    out = generate(model, ["Hello"], tokenizer=tok, max_new_tokens=32)
    out.tokens[0], out.texts[0], out.finish_reasons[0]
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from derta_jax.models import sharding as sharding_lib
from derta_jax.models.attention import KVCache, init_kv_cache

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop_string", "length"


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    tokens: list[list[int]]        # generated ids per row (EOS included when it ended the row)
    texts: Optional[list[str]]     # decoded text per row (tokenizer given), cut before a stop string
    finish_reasons: list[str]      # "eos" | "stop_string" | "length"


# ----------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------

def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, width: Optional[int] = None):
    """-> (input_ids, positions, segment_ids), each int32 [B, T] with T the longest prompt
    (or `width`, when given and not shorter)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    width = max(max(len(p) for p in prompts), width or 0)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    segments = np.zeros((len(prompts), width), np.int32)
    positions = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        start = width - len(prompt)
        ids[row, start:] = prompt
        segments[row, start:] = 1
        positions[row, start:] = np.arange(len(prompt))
    return ids, positions, segments


def batch_rows(prompts: Sequence[Sequence[int]], pad_id: int,
               mesh: Optional[jax.sharding.Mesh], width_multiple: int, min_rows: int = 0):
    """-> (padded prompts, (ids, positions, segments) on the device(s)). The batch gains
    dummy one-token rows up to `min_rows` and, on a mesh, to a multiple of its batch shards,
    and is split over them; prompts are left-padded to a multiple of `width_multiple`
    (nearby lengths, and a short last batch, share one compiled program). Shared by
    generation and scoring (models/scoring.py)."""
    rows = max(len(prompts), min_rows)
    if mesh is not None:
        rows = _round_up(rows, sharding_lib.batch_shards(mesh))
    padded = [list(p) for p in prompts] + [[pad_id]] * (rows - len(prompts))
    arrays = left_pad(padded, pad_id, _round_up(max(map(len, padded)), width_multiple))
    # committed like the loop's outputs (one device: every call reuses one program)
    where = _first_device() if mesh is None else sharding_lib.batch_sharding(mesh)
    return padded, tuple(sharding_lib.put_global(a, where) for a in arrays)


def _first_device() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def sample_tokens(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next token per row from float32 logits [B, V]: argmax when temperature == 0,
    otherwise a draw from softmax(logits / temperature) restricted to the smallest set
    of most likely tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = mass_before < top_p  # the most likely token is always kept
        threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------
# Compiled model calls (the graphdef is static; the state is traced)
# ----------------------------------------------------------------------------------------

class DecodeCarry(NamedTuple):
    """What one decoded token hands to the next, all on device."""

    cache: KVCache
    logits: jax.Array     # [B, V] float32: the distribution of each row's next token
    positions: jax.Array  # [B] int32: the RoPE position of each row's next token
    done: jax.Array       # [B] bool: rows that ended (EOS on device; stop strings from the host)
    rng: jax.Array


class Forcing(NamedTuple):
    """Rank-assisted forcing of the first tokens of each row (eval/rank_prefill.py): at step
    s, a row whose `ids[row, s]` is a token (>= 0) takes it when it is among the model's
    top `rank_k` next tokens, else the best-ranked of those that is not `banned`."""

    ids: jax.Array     # [B, F] int32: each row's reference token per step, -1 = not forced
    banned: jax.Array  # [V] bool: never chosen in place of the reference
    offset: jax.Array  # int32 scalar: tokens generated before this call of the loop


def rank_assisted_tokens(logits: jax.Array, reference: jax.Array, rank_k: int,
                         banned: jax.Array) -> jax.Array:
    """[B]: the reference token where it ranks in the top `rank_k` of `logits` [B, V], else
    the highest-ranked top-k token that is not banned (the top one when all are banned)."""
    _, top = jax.lax.top_k(logits, rank_k)                        # [B, k], best first
    in_top = jnp.any(top == reference[:, None], axis=-1)
    first_allowed = jnp.argmax(~banned[top], axis=-1)             # 0 when none is allowed
    fallback = jnp.take_along_axis(top, first_allowed[:, None], axis=-1)[:, 0]
    return jnp.where(in_top, reference, fallback).astype(jnp.int32)


def _constrain(tree, shardings):
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def carry_shardings(config, mesh: jax.sharding.Mesh, rows: int, cache_len: int) -> DecodeCarry:
    """Where each part of the carry lives on `mesh`: the KV cache by the rule table
    (models/sharding.kv_cache_shardings), per-row arrays over the batch axes, the key replicated.
    Fixed shardings keep every call of `decode_chunk` on one compiled program."""
    rows2, rows1 = sharding_lib.batch_sharding(mesh), sharding_lib.batch_sharding(mesh, ndim=1)
    return DecodeCarry(cache=sharding_lib.kv_cache_shardings(config, mesh, rows, cache_len),
                       logits=rows2, positions=rows1, done=rows1, rng=sharding_lib.replicated(mesh))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _empty_cache(config, rows: int, length: int, shardings: Optional[DecodeCarry]) -> KVCache:
    cache = init_kv_cache(config, rows, length)
    return cache if shardings is None else _constrain(cache, shardings.cache)


def _placed_key(rng: jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
    """A copy of the caller's key on `sharding` (the decode loop donates its carry, key
    included; a jitted function's output is a new buffer); multi-host safe."""
    data = sharding_lib.put_global(jax.random.key_data(rng), sharding)
    return _wrap_key(data, jax.random.key_impl(rng))


@functools.partial(jax.jit, static_argnums=(1,))
def _wrap_key(data: jax.Array, impl) -> jax.Array:
    return jax.random.wrap_key_data(data, impl=impl)


@jax.jit
def _or(done: jax.Array, stopped: jax.Array) -> jax.Array:
    return done | stopped


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(5,))
def prefill(graphdef, state, ids, positions, segments, cache: KVCache,
            shardings: Optional[DecodeCarry]):
    """The prompts' keys and values into the cache -> (last position's logits [B, V], cache).
    This and `decode_chunk` are the programs evaluation runs (and the planner compiles)."""
    model = nnx.merge(graphdef, state)
    hidden, _, cache = model.forward_with_cache(ids, positions, segments, cache)
    logits = model.logits(hidden[:, -1:])[:, 0]
    if shardings is None:
        return logits, cache
    return _constrain(logits, shardings.logits), _constrain(cache, shardings.cache)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 10), donate_argnums=(2,))
def decode_chunk(graphdef, state, carry: DecodeCarry, steps, chunk: int, temperature: float,
                 top_p: float, shardings: Optional[DecodeCarry], eos_ids,
                 forcing: Optional[Forcing] = None, rank_k: int = 0):
    """Up to `steps` (<= chunk) tokens in one compiled loop, stopping early once every row
    is done -> (carry, tokens [B, chunk] of which the first `count` columns are real, count).

    Each iteration samples from the carried logits (or, for a forced step, picks by rank:
    `rank_assisted_tokens`), feeds the token and keeps the next logits; rows already done
    keep stepping (their tokens are ignored by the host)."""
    batch = carry.logits.shape[0]

    def choose(logits, rng, i):
        token = sample_tokens(logits, rng, temperature, top_p)
        if forcing is None:
            return token
        step, width = forcing.offset + i, forcing.ids.shape[1]
        reference = jnp.where(step < width, jax.lax.dynamic_index_in_dim(
            forcing.ids, jnp.minimum(step, width - 1), axis=1, keepdims=False), -1)
        forced = rank_assisted_tokens(logits, jnp.maximum(reference, 0), rank_k, forcing.banned)
        return jnp.where(reference >= 0, forced, token)

    def cond(loop):
        i, carry, _ = loop
        return (i < steps) & ~jnp.all(carry.done)

    def body(loop):
        i, carry, tokens = loop
        # new Variables in this trace (nnx.scan over layers refuses an outer trace's); the
        # weights stay loop constants, not loop state (which XLA would copy)
        model = nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf, state))
        rng, step_rng = jax.random.split(carry.rng)
        token = choose(carry.logits, step_rng, i)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        done = carry.done | jnp.any(token[:, None] == eos_ids[None, :], axis=-1)
        hidden, _, cache = model.forward_with_cache(
            token[:, None], carry.positions[:, None], jnp.ones((batch, 1), jnp.int32), carry.cache)
        carry = _constrain(DecodeCarry(cache, model.logits(hidden)[:, 0], carry.positions + 1,
                                       done, rng), shardings)
        return i + 1, carry, tokens

    start = (jnp.zeros((), jnp.int32), carry, jnp.zeros((batch, chunk), jnp.int32))
    count, carry, tokens = jax.lax.while_loop(cond, body, start)
    return carry, tokens, count


# ----------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------

def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    encoded = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return list(getattr(encoded, "ids", encoded))


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def generate(model, prompts: Union[Sequence[str], Sequence[Sequence[int]]], *,
             tokenizer: Any = None, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, eos_token_ids: Optional[Sequence[int]] = None,
             stop_strings: Sequence[str] = (), pad_id: Optional[int] = None,
             rng: Optional[jax.Array] = None, add_special_tokens: bool = True,
             check_every: int = 16, mesh: Optional[jax.sharding.Mesh] = None,
             width_multiple: int = 1, loop_tokens: Optional[int] = None,
             min_rows: int = 0, forced: Optional[Sequence[Sequence[int]]] = None,
             rank_k: int = 20, banned_ids: Sequence[int] = ()) -> GenerationOutput:
    """Generate up to `max_new_tokens` per prompt with a KV cache.

    prompts: strings (encoded with `tokenizer`, which needs `encode(text,
    add_special_tokens=...)` and `decode(ids, skip_special_tokens=True)`, as both
    transformers and tokenizers provide) or lists of token ids.
    eos_token_ids: default the model config's eos_token_id. stop_strings need a
    tokenizer; a row stops at the first token after which its decoded text contains one.

    Decoding runs as one compiled loop on the device, which stops as soon as every row
    has produced an EOS. With stop strings the host decodes the text every `check_every`
    tokens (a loop of that many tokens per call) and tells the device which rows stopped.

    mesh: decode on this mesh (the model's weights already placed on it, e.g. by
    derta_jax.weights.load_model(mesh=...)): rows are split over its batch axes (data,
    fsdp; the batch is padded with dummy rows to a multiple), the KV cache too, and kv
    heads over `tensor`. width_multiple: pad prompts to a multiple of this width, so that
    batches of similar lengths share one compiled program; min_rows: pad the batch with
    dummy rows to at least this many (a short last batch then reuses the full batches'
    program instead of compiling its own). forced: per prompt, reference tokens for its
    first generated tokens, each taken when it ranks in the model's top `rank_k`, else the
    best-ranked top-k token not in `banned_ids` (rank-assisted prefilling,
    eval/rank_prefill.py); the outputs hold the tokens chosen. loop_tokens: tokens per compiled
    call (default: all of them, or `check_every` with stop strings; 1 = one dispatch per
    token, the benchmark's baseline).
    """
    config = model.config
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, "
                         f"got temperature={temperature}, top_p={top_p}")
    if check_every < 1 or width_multiple < 1 or (loop_tokens is not None and loop_tokens < 1):
        raise ValueError(f"generate: check_every={check_every}, width_multiple="
                         f"{width_multiple} and loop_tokens={loop_tokens} must be >= 1")
    if stop_strings and tokenizer is None:
        raise ValueError("generate: stop_strings need a tokenizer to decode the output")
    if forced is not None and any(not 0 <= int(i) < config.vocab_size for i in banned_ids):
        raise ValueError(f"generate: banned_ids must be token ids below the vocabulary size "
                         f"{config.vocab_size}")
    if forced is not None and (len(forced) != len(prompts) or not 1 <= rank_k <= config.vocab_size):
        raise ValueError(f"generate: forced needs one reference list per prompt and 1 <= "
                         f"rank_k <= vocab size, got {len(forced)} for {len(prompts)} prompts, "
                         f"rank_k={rank_k}")
    if prompts and isinstance(prompts[0], str):
        if tokenizer is None:
            raise ValueError("generate: text prompts need a tokenizer")
        prompt_ids = [_encode(tokenizer, p, add_special_tokens) for p in prompts]
    else:
        prompt_ids = [list(map(int, p)) for p in prompts]
    if eos_token_ids is None:
        eos_token_ids = [] if config.eos_token_id is None else [config.eos_token_id]
    eos = set(int(e) for e in eos_token_ids)
    pad_id = pad_id if pad_id is not None else (config.pad_token_id or 0)
    rng = rng if rng is not None else jax.random.key(0)

    real_rows = len(prompt_ids)
    longest = max((len(p) for p in prompt_ids), default=0)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"generate: a prompt of {longest} tokens + max_new_tokens="
                         f"{max_new_tokens} is beyond the model's context "
                         f"(max_position_embeddings={config.max_position_embeddings}); "
                         f"shorten the prompt or lower max_new_tokens")
    # dummy rows (on a mesh) are done from the start
    padded, inputs = batch_rows(prompt_ids, pad_id, mesh, width_multiple, min_rows)
    rows, width = inputs[0].shape
    chunk = min(loop_tokens or (check_every if stop_strings else max_new_tokens), max_new_tokens)
    graphdef, state = nnx.split(model)
    done = np.arange(rows) >= real_rows
    next_positions = np.asarray([len(p) for p in padded], np.int32)
    shardings = None
    context = contextlib.nullcontext()
    rows_at = key_at = _first_device()
    if mesh is not None:
        shardings = carry_shardings(config, mesh, rows, width + max_new_tokens)
        rows_at, key_at = shardings.done, shardings.rng
        context = jax.set_mesh(mesh)
    done, next_positions = (sharding_lib.put_global(a, rows_at) for a in (done, next_positions))
    rng = _placed_key(rng, key_at)
    eos_ids = np.asarray(sorted(eos), np.int32).reshape(-1)  # numpy: replicated, as jit's input
    forced_ids = banned = None
    if forced is not None:
        width_forced = max([len(f) for f in forced] + [1])
        forced_ids = np.full((rows, width_forced), -1, np.int32)
        for row, reference in enumerate(forced):
            forced_ids[row, :len(reference)] = reference
        forced_ids = sharding_lib.put_global(
            forced_ids, _first_device() if mesh is None else sharding_lib.batch_sharding(mesh))
        banned = np.zeros(config.vocab_size, bool)
        banned[list(banned_ids)] = True
        banned = sharding_lib.put_global(banned, key_at)  # replicated

    generated: list[list[int]] = [[] for _ in range(real_rows)]
    finish: list[Optional[str]] = [None] * real_rows
    with context:
        cache = _empty_cache(config, rows, width + max_new_tokens, shardings)
        logits, cache = prefill(graphdef, state, *inputs, cache, shardings)
        carry = DecodeCarry(cache, logits, next_positions, done, rng)
        remaining = max_new_tokens
        while remaining > 0:
            forcing = None if forced is None else Forcing(
                forced_ids, banned, np.int32(max_new_tokens - remaining))
            carry, tokens, count = decode_chunk(graphdef, state, carry,
                                                np.int32(min(chunk, remaining)),
                                                chunk, float(temperature), float(top_p),
                                                shardings, eos_ids, forcing,
                                                rank_k if forced is not None else 0)
            count = int(count)
            # every process sees every row's tokens (and stops the same rows)
            stopped = _absorb(sharding_lib.fetch_global(tokens)[:real_rows, :count], generated,
                              finish, eos, tokenizer, stop_strings)
            remaining -= count
            if all(f is not None for f in finish) or count == 0:
                break
            if stopped:
                mask = np.zeros(rows, bool)
                mask[stopped] = True
                carry = carry._replace(done=_or(carry.done, sharding_lib.put_global(mask, rows_at)))

    finish = [f or FINISH_LENGTH for f in finish]
    texts = None
    if tokenizer is not None:
        texts = [_final_text(tokenizer, toks, reason, eos, stop_strings)
                 for toks, reason in zip(generated, finish)]
    return GenerationOutput(tokens=generated, texts=texts, finish_reasons=finish)


def _absorb(tokens: np.ndarray, generated: list[list[int]], finish: list[Optional[str]],
            eos: set, tokenizer, stop_strings: Sequence[str]) -> list[int]:
    """Append each unfinished row's new tokens until it ends -> rows ended by a stop string."""
    stopped = []
    for row, new_tokens in enumerate(tokens.tolist()):
        for tok in new_tokens:
            if finish[row] is not None:
                break
            generated[row].append(tok)
            if tok in eos:
                finish[row] = FINISH_EOS
            elif stop_strings and _ends_at_stop(tokenizer, generated[row], stop_strings):
                finish[row] = FINISH_STOP
                stopped.append(row)
    return stopped


def _ends_at_stop(tokenizer, tokens: list[int], stop_strings: Sequence[str]) -> bool:
    """Does the text end with a completed stop string? Checked after every token, so only
    a tail long enough to hold the longest stop string (every token decodes to at least
    one character, give or take a split multi-byte character) needs decoding."""
    tail = tokens[-(max(len(s) for s in stop_strings) + 8):]
    text = _decode(tokenizer, tail)
    return any(s in text for s in stop_strings)


def _final_text(tokenizer, tokens, reason, eos, stop_strings) -> str:
    if reason == FINISH_EOS:
        tokens = tokens[:-1]
    text = _decode(tokenizer, tokens)
    if reason == FINISH_STOP:
        cut = min(text.find(s) for s in stop_strings if s in text)
        text = text[:cut]
    return text
