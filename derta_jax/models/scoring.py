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
import numpy as np
from flax import nnx

from derta_jax.models.decode import batch_rows
from derta_jax.models.sharding import fetch_global


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
    _, inputs = batch_rows(prompts, pad_id, mesh, width_multiple)
    graphdef, state = nnx.split(model)
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        logits = _last_logits(graphdef, state, *inputs)
    return fetch_global(logits)[:len(prompts)]
