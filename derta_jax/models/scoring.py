"""Scoring text without generating it: the next-token distribution after each prompt.

Why: a guard model judges a response from ONE forward pass (P("unsafe") at the last
prompt position, derta_jax/eval/guard_classifier.py). A 7-13B guard on a pod must run
where the evaluated model runs, on the mesh with the trainer's shardings, not on one
host; this is that forward pass, batched and sharded like decoding (models/decode.py).

    logits = next_token_logits(model, [ids_a, ids_b], mesh=mesh)   # float32 [2, vocab]

Prompts are left-padded (padding in segment 0, never attended; RoPE positions from each
row's first real token) to a multiple of `width_multiple`, so prompts of nearby lengths
share one compiled program; on a mesh the rows are split over the batch axes (padded
with dummy rows to a multiple) and the logits gathered back to the host.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from derta_jax.models import sharding as sharding_lib
from derta_jax.models.decode import left_pad


@functools.partial(jax.jit, static_argnums=(0,))
def _last_logits(graphdef, state, ids, positions, segments):
    model = nnx.merge(graphdef, state)
    hidden, _ = model(ids, positions, segments)
    return model.logits(hidden[:, -1:])[:, 0]


def next_token_logits(model: Any, prompts: Sequence[Sequence[int]], *,
                      mesh: Optional[jax.sharding.Mesh] = None, width_multiple: int = 16,
                      pad_id: int = 0) -> np.ndarray:
    """float32 [len(prompts), vocab]: the logits of the token after each prompt.
    mesh: the model's weights already placed on it (derta_jax.weights.load_model(mesh=))."""
    real_rows = len(prompts)
    rows = real_rows if mesh is None else -(-real_rows // sharding_lib.batch_shards(mesh)) * (
        sharding_lib.batch_shards(mesh))
    padded = [list(p) for p in prompts] + [[pad_id]] * (rows - real_rows)
    width = max(map(len, padded))
    ids, positions, segments = left_pad(padded, pad_id, -(-width // width_multiple) * width_multiple)
    inputs = (jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(segments))
    context = contextlib.nullcontext()
    if mesh is not None:
        inputs = jax.device_put(inputs, sharding_lib.batch_sharding(mesh))
        context = jax.set_mesh(mesh)
    graphdef, state = nnx.split(model)
    with context:
        logits = _last_logits(graphdef, state, *inputs)
    return np.asarray(logits)[:real_rows]
