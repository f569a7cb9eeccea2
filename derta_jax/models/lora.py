"""LoRA model surgery for the derta_jax Transformer: attach, drop out, merge.

The one LoRA module of the project: the trainer (adapters over a frozen base), export
(merge, PEFT layout in derta_jax.hf.peft) and evaluate (a LoRA workdir merged into a plain
model) all use it; building the adapted model and its weights is derta_jax.weights's job.

    settings = LoraSettings.from_config(config.lora)
    adapted = add_lora(model, settings, rngs=nnx.Rngs(params=lora_init_key(seed)))
    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
    ...
    set_dropout_keys(model, key)   # inside the train step, after nnx.merge

Why our own adapters and not Qwix's `LoraProvider`: Qwix 0.1.8 (checked on this code base)
(1) raises an IndexError in `apply_lora_to_model` when the layers are scanned
(`scan_layers=True`, which the 70B and 8x7B LoRA recipes use): it creates adapters lazily
during a first forward pass, here inside `nnx.scan`; (2) gives adapters the base kernel's dtype, so a bf16 base gets bf16 adapters
and bf16 optimiser updates, where f32 adapters are wanted; (3) draws LoRA dropout keys
from a stateful `nnx.Rngs` attribute on every module, which does not fit a pure step whose
key must come from the step's rng (exact resume) and differ from layer to layer under
`nnx.scan`; (4) does not intercept `ragged_dot`, so Mixtral's experts get nothing.
We keep Qwix's parameter names and layout: a kernel `W [*in, *out]` gets `kernel_lora_a [*in, r]` and `kernel_lora_b [r, *out]`
(nnx.LoRAParam), and the layer computes `x @ W + (alpha / r) * dropout(x) @ A @ B`.

How: every `Projection` whose dotted module path matches `targets` (re.search, e.g.
"layers.3.attn.q_proj", or "layers.attn.q_proj" with scanned layers) is turned into a
`LoraProjection` in place (its class is swapped; the kernel is untouched), and every
Mixtral `MoE` block whose expert weights ("layers.3.moe.w_gate") match gets per-expert
adapters `w_gate_lora_a [E, D, r]` / `w_gate_lora_b [E, r, F]`, which
derta_jax.models.moe applies as grouped matmuls (no dropout there: the block exposes no
hook for it). Stacked (scanned) kernels get stacked adapters with the same leading
"layers" axis, so `nnx.scan` slices them with the layer. A starts uniform in
±1/sqrt(fan_in) (PEFT's default), B at zero: the adapted model starts as the base model.

Adapters carry logical axis names derived from their kernel's (A: the kernel's input axes
+ rank; B: rank + the kernel's output axes; the rank axis is replicated), so the trainer's
mesh rules shard them like the base kernels.

Dropout: a `LoraProjection` drops out its LoRA input only when the train step has given it
a key (`set_dropout_keys`); models built for evaluation or export never are, so they are
deterministic. Keys derive from the micro-batch's key, the adapter's index, and (scanned)
the layer, so a resumed run draws the same masks as an uninterrupted one.

Merge: `merge_lora` is W + (alpha/r) A B in float32, cast back to W's dtype; it is the
one formula that export (HF tensors, streamed) and evaluate (`merge_into_params`) share.

The run's LoRA settings and where its frozen base came from are recorded in
WORKDIR/lora.json (derta_jax.workdir.write_lora_record / read_lora_record): checkpoints
hold only the adapters and their optimiser state, never the base.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from derta_jax.models.layers import Projection

RECORD_FILE = "lora.json"
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
_EXPERT_AXES = {"w_gate": ("experts", "embed", "mlp"), "w_up": ("experts", "embed", "mlp"),
                "w_down": ("experts", "mlp", "embed")}
_INIT_STREAM = 0x10AA  # folded into the run's seed for the adapters' initial values
_DROPOUT_STREAM = 0xD40  # folded into the micro-batch key for dropout masks


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: str = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
    dtype: str = "float32"  # adapters (and so their optimiser state), whatever the base dtype

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)

    @classmethod
    def from_config(cls, lora_config: Any) -> "LoraSettings":
        return cls(rank=int(lora_config.rank), alpha=float(lora_config.alpha),
                   dropout=float(lora_config.dropout), targets=str(lora_config.targets)).validate()

    def validate(self) -> "LoraSettings":
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank={self.rank!r}: must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout!r}: must be in [0, 1)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"lora.dtype={self.dtype!r}: must be float32, bfloat16 or float16")
        try:
            re.compile(self.targets)
        except re.error as err:
            raise ValueError(f"lora.targets={self.targets!r}: not a regular expression ({err})") from None
        return self


# ----------------------------------------------------------------------------- pure parts

def split_equation(equation: str, rank_char: Optional[str] = None) -> tuple[str, str, int]:
    """A projection's einsum 'lhs,rhs->out' -> (x @ A equation, (x A) @ B equation, #in dims).

    The kernel's axes must be its contracted (input) axes first, then its output axes,
    the layout derta_jax.hf.peft assumes for A [*in, r] and B [r, *out]."""
    try:
        inputs, out = equation.replace(" ", "").split("->")
        lhs, rhs = inputs.split(",")
    except ValueError:
        raise ValueError(f"einsum {equation!r}: expected 'lhs,rhs->out'") from None
    contracted = "".join(c for c in rhs if c in lhs)
    kept = "".join(c for c in rhs if c not in lhs)
    if rhs != contracted + kept:
        raise ValueError(f"einsum {equation!r}: the kernel must list its input axes before "
                         f"its output axes for LoRA")
    r = rank_char or next(c for c in "rzyxwvuq" if c not in equation)
    low = "".join(c for c in lhs if c not in contracted) + r
    return f"{lhs},{contracted}{r}->{low}", f"{low},{r}{kept}->{out}", len(contracted)


def lora_dropout(x: jax.Array, key: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout: zero each entry with probability `rate`, scale the rest by 1/(1-rate)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def _uniform_fan_in(key: jax.Array, shape: tuple, fan_in: int, dtype) -> jax.Array:
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


# ----------------------------------------------------------------------------- modules

class LoraDropoutKey(nnx.Param):
    """The PRNG key data of one adapter's dropout for one forward pass (set by the step).

    A Param subtype only because the scanned layer stack slices `nnx.Param` state along
    the layer axis and broadcasts all other state (derta_jax.models.transformer), and each
    layer needs its own key. It exists only on the model merged inside the train step,
    after the trained/frozen split, so it is never trained, split out or checkpointed."""


class LoraProjection(Projection):
    """A `Projection` plus `(alpha / r) * dropout(x) @ kernel_lora_a @ kernel_lora_b`.

    Made by `add_lora` from an existing Projection; never constructed directly."""

    def __call__(self, x: jax.Array) -> jax.Array:
        out = super().__call__(x)
        h = x.astype(self.dtype)
        key = getattr(self, "lora_dropout_key", None)
        if self.lora_dropout > 0.0 and key is not None:
            h = lora_dropout(h, jax.random.wrap_key_data(key[...]), self.lora_dropout)
        equation_a, equation_b, _ = split_equation(self.equation)
        low = jnp.einsum(equation_a, h, self.kernel_lora_a[...].astype(self.dtype))
        delta = jnp.einsum(equation_b, low, self.kernel_lora_b[...].astype(self.dtype))
        return out + (self.lora_scale * delta).astype(out.dtype)


def lora_init_key(seed: int) -> jax.Array:
    """The key the adapters' initial values come from: the run's seed, its own stream."""
    return jax.random.fold_in(jax.random.key(seed), _INIT_STREAM)


def _dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def _adapter_param(value: jax.Array, axes: Optional[tuple]) -> nnx.LoRAParam:
    if axes is None:
        return nnx.LoRAParam(value)
    return nnx.LoRAParam(value, out_sharding=tuple(axes), eager_sharding=False)


def _attach_projection(module: Projection, settings: LoraSettings, rngs: nnx.Rngs) -> None:
    _, _, num_in = split_equation(module.equation)
    kernel = module.kernel
    num_out = len(module.equation.split("->")[0].split(",")[1]) - num_in
    lead = kernel.ndim - num_in - num_out  # 1 with scanned layers (leading "layers" axis)
    if lead not in (0, 1):
        raise ValueError(f"kernel of shape {kernel.shape} does not fit einsum {module.equation!r}")
    shape = tuple(kernel.shape)
    in_shape, out_shape = shape[lead:lead + num_in], shape[lead + num_in:]
    dtype = jnp.dtype(settings.dtype)
    a = _uniform_fan_in(rngs.params(), shape[:lead] + in_shape + (settings.rank,),
                        math.prod(in_shape), dtype)
    b = jnp.zeros(shape[:lead] + (settings.rank,) + out_shape, dtype)
    names = kernel.get_metadata().get("out_sharding")
    a_axes = b_axes = None
    if names is not None:
        names = tuple(names)
        a_axes = names[:lead + num_in] + (None,)
        b_axes = names[:lead] + (None,) + names[lead + num_in:]
    module.__class__ = LoraProjection
    module.kernel_lora_a = _adapter_param(a, a_axes)
    module.kernel_lora_b = _adapter_param(b, b_axes)
    module.lora_scale = settings.scale
    module.lora_dropout = settings.dropout
    module.lora_stack = shape[0] if lead else 0


def _attach_experts(moe: nnx.Module, names: list[str], settings: LoraSettings,
                    rngs: nnx.Rngs) -> None:
    dtype = jnp.dtype(settings.dtype)
    for name in names:
        base = getattr(moe, name)
        shape = tuple(base.shape)
        lead = len(shape) - 3  # 1 with scanned layers
        experts, fan_in, fan_out = shape[lead:]
        a = _uniform_fan_in(rngs.params(), shape[:lead] + (experts, fan_in, settings.rank),
                            fan_in, dtype)
        b = jnp.zeros(shape[:lead] + (experts, settings.rank, fan_out), dtype)
        expert_axis, in_axis, out_axis = _EXPERT_AXES[name]
        leading = ("layers",) * lead
        setattr(moe, f"{name}_lora_a", _adapter_param(a, leading + (expert_axis, in_axis, None)))
        setattr(moe, f"{name}_lora_b", _adapter_param(b, leading + (expert_axis, None, out_axis)))
    moe.lora_scale = settings.scale


def add_lora(model: nnx.Module, settings: LoraSettings, *, rngs: nnx.Rngs) -> list[str]:
    """Attaches adapters in place to every targeted projection / expert weight.

    Returns the adapted base parameter paths (dotted, e.g. 'layers.0.attn.q_proj.kernel',
    'layers.0.moe.w_gate'); raises ValueError naming `lora.targets` if nothing matched."""
    from derta_jax.models.moe import MoE

    settings.validate()
    pattern = re.compile(settings.targets)
    adapted: list[str] = []
    for path, module in list(nnx.iter_modules(model)):
        dotted = _dotted(path)
        if isinstance(module, LoraProjection):
            raise ValueError(f"{dotted}: already has LoRA adapters")
        if isinstance(module, Projection) and pattern.search(dotted):
            _attach_projection(module, settings, rngs)
            adapted.append(f"{dotted}.kernel")
        elif isinstance(module, MoE):
            names = [n for n in EXPERT_WEIGHTS if pattern.search(f"{dotted}.{n}")]
            if names:
                _attach_experts(module, names, settings, rngs)
                adapted += [f"{dotted}.{n}" for n in names]
    if not adapted:
        raise ValueError(f"lora.targets={settings.targets!r}: matches no projection or expert "
                         f"weight of the model (module paths look like 'layers.0.attn.q_proj')")
    return adapted


def set_dropout_keys(model: nnx.Module, key: jax.Array) -> int:
    """Gives every LoraProjection with dropout > 0 its own key for the next forward pass.

    Call it on the model merged inside the (traced) train step, with the micro-batch's key;
    returns how many projections got keys."""
    key = jax.random.fold_in(key, _DROPOUT_STREAM)
    count = 0
    for index, (_, module) in enumerate(nnx.iter_modules(model)):
        if isinstance(module, LoraProjection) and module.lora_dropout > 0.0:
            module_key = jax.random.fold_in(key, index)
            if module.lora_stack:
                module_key = jax.random.split(module_key, module.lora_stack)
            # Raw key data: nnx.scan slices plain arrays along the layer axis.
            module.lora_dropout_key = LoraDropoutKey(jax.random.key_data(module_key))
            count += 1
    return count


# ----------------------------------------------------------------------------- merge math

LORA_A_SUFFIX, LORA_B_SUFFIX = "_lora_a", "_lora_b"


def lora_scale(alpha: float, rank: int) -> float:
    if rank <= 0:
        raise ValueError(f"lora rank={rank!r}: must be positive")
    return float(alpha) / float(rank)


def merge_lora(kernel, lora_a, lora_b, alpha: float, rank: int):
    """W + (alpha/r) * A @ B in the derta_jax layout, computed in float32, returned in W's
    dtype. The one merge formula: export (HF tensors) and evaluate (model weights) both call
    it, so a merged export and an evaluated LoRA workdir hold the same weights bit for bit."""
    import numpy as np

    if lora_a.shape[-1] != rank or lora_b.shape[0] != rank:
        raise ValueError(f"LoRA shapes A {lora_a.shape} / B {lora_b.shape} do not have rank {rank}")
    in_dims, out_dims = lora_a.shape[:-1], lora_b.shape[1:]
    if tuple(kernel.shape) != tuple(in_dims) + tuple(out_dims):
        raise ValueError(f"kernel shape {kernel.shape} does not match LoRA A {lora_a.shape} "
                         f"and B {lora_b.shape}")
    delta = np.tensordot(np.asarray(lora_a, np.float32), np.asarray(lora_b, np.float32), axes=1)
    merged = np.asarray(kernel, np.float32) + lora_scale(alpha, rank) * delta
    return merged.astype(kernel.dtype)


def adapter_pairs(adapters: Any) -> dict:
    """Nested dict of adapter arrays (as checkpointed) -> {base parameter path: (A, B)}.

    Adapters are named after their base parameter: `kernel` -> `kernel_lora_a` /
    `kernel_lora_b`, `w_gate` -> `w_gate_lora_a` / ..."""
    from collections.abc import Mapping

    import numpy as np

    flat: dict = {}

    def walk(prefix: tuple, node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(prefix + (key,), value)
        else:
            flat[prefix] = node

    walk((), adapters)
    pairs: dict = {}
    for path, value in flat.items():
        name = str(path[-1])
        if not name.endswith(LORA_A_SUFFIX):
            if not name.endswith(LORA_B_SUFFIX):
                raise ValueError(f"adapter parameter {_dotted(path)}: not a LoRA A/B name")
            continue
        base = path[:-1] + (name[:-len(LORA_A_SUFFIX)],)
        b_path = path[:-1] + (name[:-len(LORA_A_SUFFIX)] + LORA_B_SUFFIX,)
        if b_path not in flat:
            raise ValueError(f"adapter parameter {_dotted(path)}: its B {_dotted(b_path)} "
                             f"is missing")
        pairs[base] = (np.asarray(value), np.asarray(flat[b_path]))
    return pairs


def merge_into_params(base: dict, adapters: dict, settings: LoraSettings) -> dict:
    """The base parameters (pure nested dict, model layout) with every adapted weight
    replaced by merge_lora of its adapters: a plain (adapter-free) model's parameters.
    Stacked (scanned) kernels merge layer by layer, expert weights expert by expert, as
    the adapters' leading axes say; the result lives on the host (numpy)."""
    import numpy as np

    merged = jax.tree.map(np.asarray, base)
    for path, (lora_a, lora_b) in adapter_pairs(adapters).items():
        node = merged
        try:
            for key in path[:-1]:
                node = node[key]
            kernel = node[path[-1]]
        except KeyError:
            raise ValueError(f"adapter of {_dotted(path)}: the base model has no such "
                             f"parameter") from None
        lora_a, lora_b = np.asarray(lora_a), np.asarray(lora_b)
        lead = lora_a.ndim + lora_b.ndim - kernel.ndim - 2  # stacked layers, experts
        if lead <= 0:
            node[path[-1]] = merge_lora(kernel, lora_a, lora_b, settings.alpha, settings.rank)
            continue
        lead_shape = lora_a.shape[:lead]
        out = np.empty_like(kernel)
        for index in np.ndindex(*lead_shape):
            out[index] = merge_lora(kernel[index], lora_a[index], lora_b[index],
                                    settings.alpha, settings.rank)
        node[path[-1]] = out
    return merged
