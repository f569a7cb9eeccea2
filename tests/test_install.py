"""The installed package trains from a recipe file outside the checkout (no configs/)."""

from __future__ import annotations

import json


def test_installed_package_trains_from_a_config_file_in_an_empty_directory(installed, tmp_path):
    recipe = tmp_path / "my_recipe.py"
    recipe.write_text(
        "from derta_jax.train.config import tiny_config\n\n\n"
        "def get_config():\n"
        "    c = tiny_config()\n"
        "    c.model.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,\n"
        "                   num_kv_heads=1, head_dim=16)\n"
        "    c.data.update(synthetic_triples=20, synthetic_helpful=40, num_safety=20,\n"
        "                  max_length=96)\n"
        "    c.train.update(batch_size=8, max_steps=2, log_every=1)\n"
        "    return c\n")
    workdir = tmp_path / "run"
    result = installed(["python", "-m", "derta_jax.train", f"--config={recipe}",
                        f"--config.workdir={workdir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 2
    # the console script is the same command (up to its config check, without another run)
    bad = installed(["derta-train", f"--config={recipe}", "--config.train.batch_size=0"],
                    cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert bad.stderr.strip() == "error: train.batch_size=0: must be >= 1"
