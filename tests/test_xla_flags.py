"""The training step's XLA compiler options by platform (derta_jax/xla_flags.py): CPU only,
only under the jaxlib they were measured with, off with DERTA_JAX_XLA_DEFAULTS=0; they do
what they claim (reductions stay out of YNNPACK), and the trainer's step is compiled with
them while the rest of the program (decoding) keeps XLA's defaults."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from derta_jax import xla_flags
from derta_jax.train.config import tiny_config
from derta_jax.train import mesh as mesh_lib
from derta_jax.train.state import assemble

CPU = dict(xla_flags.CPU_STEP_OPTIONS)


def test_cpu_only_measured_jaxlib_only_and_the_opt_out():
    assert xla_flags.step_compiler_options("cpu", {}, "0.10.2") == CPU
    assert CPU == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
    assert xla_flags.step_compiler_options("gpu", {}, "0.10.2") == {}
    assert xla_flags.step_compiler_options("tpu", {}, "0.10.2") == {}
    assert xla_flags.step_compiler_options("cpu", {}, "0.11.2") == {}
    assert xla_flags.step_compiler_options("cpu", {"DERTA_JAX_XLA_DEFAULTS": "0"}, "0.10.2") == {}


def _root_in_ynnpack(compiled_text: str) -> bool:
    root = next(line for line in compiled_text.split("ENTRY", 1)[1].splitlines() if "ROOT" in line)
    return "__ynn_fusion" in root


def test_the_options_keep_a_reduction_out_of_ynnpack():
    """A dot, tanh and row sum: XLA's default fuses the sum into a YNNPACK fusion; with the
    options it is XLA's own reduction."""
    f = lambda a, b: jnp.sum(jnp.tanh(a @ b), axis=1)  # noqa: E731
    x = jnp.ones((256, 256))
    default = jax.jit(f).lower(x, x).compile().as_text()
    ours = jax.jit(f, compiler_options=CPU).lower(x, x).compile().as_text()
    assert _root_in_ynnpack(default) and not _root_in_ynnpack(ours)
    np.testing.assert_allclose(jax.jit(f, compiler_options=CPU)(x, x), jax.jit(f)(x, x),
                               rtol=1e-6)


def _reductions_in_ynnpack(compiled_text: str) -> int:
    """How many YNNPACK fusions' computations hold a reduce (not a reduce-window)."""
    bodies, name, lines = {}, None, []
    for line in compiled_text.splitlines():
        if line and not line.startswith(" ") and "{" in line:
            name, lines = line.split()[0].lstrip("%"), []
        elif line.startswith("}") and name:
            bodies[name] = "\n".join(lines)
        else:
            lines.append(line)
    called = [line.split("calls=%")[1].split(",")[0] for line in compiled_text.splitlines()
              if "__ynn_fusion" in line and "calls=%" in line]
    return sum(" reduce(" in bodies.get(c, "") for c in called)


def test_the_trainers_step_is_compiled_with_them(monkeypatch):
    """The trainer's own step (train.state.assemble) on CPU: with the options no YNNPACK
    fusion holds a reduction; with XLA's defaults (the opt-out) some do."""
    config = tiny_config()
    config.train.batch_size = 2
    config.data.max_length = 32
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1},
                              devices=jax.devices()[:1])
    counts = {}
    for name, opt_out in (("ours", None), ("xla", "0")):
        if opt_out is not None:
            monkeypatch.setenv("DERTA_JAX_XLA_DEFAULTS", opt_out)
        a = assemble(config, mesh, total_steps=10)
        counts[name] = _reductions_in_ynnpack(a.lower(*a.abstract_inputs()).compile().as_text())
    assert counts["ours"] == 0 < counts["xla"], counts
