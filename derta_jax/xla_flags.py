"""XLA compiler options for the training step, by platform: the one place they are chosen.

  CPU: xla_cpu_experimental_ynn_fusion_type = LIBRARY_FUSION_TYPE_DOT
      XLA:CPU in jaxlib 0.10 hands dots AND reductions/elementwise ops to YNNPACK by
      default; with dots only (the rest to XLA's own loop emitter) the CPU training step of
      benchmarks/train_step.py ran 1.09-1.14x PyTorch's instead of 0.98-1.01x (three runs
      each, BENCHMARKS.md), and the SmolLM2 LoRA step 1.31x faster. Only the training step
      gets it: set process-wide (XLA_FLAGS) it made the decode loop copy the whole KV cache
      every token (tests/test_models_decode.py), and the forward alone gained nothing.

Why per compile (jax.jit's compiler_options) and not XLA_FLAGS: the options then follow the
step wherever it is compiled (trainer, benchmarks, planner) and nothing else. Added only under
the jaxlib series they were measured with (an unknown option fails the compile);
DERTA_JAX_XLA_DEFAULTS=0 adds none (XLA's own defaults, e.g. to measure against them).
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Mapping, Optional

CPU_STEP_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
MEASURED_JAXLIB = "0.10."  # the series whose XLA knows (and was measured with) these options
OPT_OUT = "DERTA_JAX_XLA_DEFAULTS"


def _jaxlib_version() -> str:
    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return ""


def step_compiler_options(platform: str, environ: Mapping[str, str] = os.environ,
                          jaxlib_version: Optional[str] = None) -> dict:
    """jax.jit compiler_options for a training step compiled for `platform`."""
    version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
    if (platform != "cpu" or not version.startswith(MEASURED_JAXLIB)
            or environ.get(OPT_OUT, "1") == "0"):
        return {}
    return dict(CPU_STEP_OPTIONS)
