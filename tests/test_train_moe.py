"""A Mixtral-style model trains through the ambient mesh: per-shard MoE dispatch, same losses.

The MoE block dispatches tokens per shard only when the step is traced under an ambient
mesh (derta_jax/models/moe.py); without one it sorts the global batch on every device and
the losses are the same, so equality alone would not show the mesh is set. The 8-device
run is in-process with a spy on `moe.token_axes` (what the block splits tokens over); the
1-device run is a subprocess (this process has 8 fake devices).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.xla_env import xla_flags

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
OVERRIDES = {
    "model.family": "mixtral", "model.num_experts": 4, "model.num_experts_per_tok": 2,
    "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 1,
    "model.num_heads": 2, "model.num_kv_heads": 1, "model.head_dim": 16,
    "data.synthetic_triples": 20, "data.synthetic_helpful": 40, "data.num_safety": 20,
    "data.max_length": 96, "train.batch_size": 8, "train.num_epochs": 4,
    "train.max_steps": STEPS, "train.log_every": 1, "checkpoint.every_steps": STEPS,
}


def _records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_mixtral_trains_per_shard_and_matches_one_device(tmp_path, monkeypatch):
    import jax

    from configs.tiny import get_config
    from derta_jax.models import moe
    from derta_jax.train import loop

    assert jax.device_count() == 8
    seen = []
    real = moe.token_axes
    monkeypatch.setattr(moe, "token_axes", lambda batch: seen.append(real(batch)) or seen[-1])
    config = get_config()
    for dotted, value in OVERRIDES.items():
        section, field = dotted.split(".")
        config[section][field] = value
    config.workdir = str(tmp_path / "eight")
    loop.run(config)
    assert seen and all(axes == ("fsdp",) for axes in seen), seen  # tokens split 8 ways

    env = dict(os.environ, XLA_FLAGS=xla_flags(1),
               PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "derta_jax.train", "--config=configs/tiny.py",
           f"--config.workdir={tmp_path / 'one'}",
           *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, eight = _records(tmp_path / "one"), _records(tmp_path / "eight")
    assert [r["step"] for r in one] == [r["step"] for r in eight] == list(range(1, STEPS + 1))
    for a, b in zip(one, eight):
        for key in ("loss", "rto_loss", "router_aux_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=2e-5), (a["step"], key)
