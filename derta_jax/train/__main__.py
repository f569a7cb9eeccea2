"""`python -m derta_jax.train --config=configs/X.py [--config.a.b=v ...]`

Trains, checkpoints into --config.workdir, and resumes from its latest checkpoint when
started again with the same command.
"""

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A recipe file in configs/.",
                                          lock_config=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from derta_jax.data.formats import DataError
    from derta_jax.train.config import ConfigError
    from derta_jax.train.loop import NonFiniteLossError, run

    try:
        summary = run(_CONFIG.value)
    except (ConfigError, DataError, NonFiniteLossError) as err:  # the user's to fix: no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    tail = summary["tail_mean_metrics"]
    fm = tail.get("metrics", {})
    print("\n=== derta_jax training summary ===")
    print(f"workdir      {summary['workdir']}")
    print(f"steps        {summary['steps']}/{summary['total_steps']}"
          f"{' (interrupted, checkpoint saved)' if summary['interrupted'] else ''}"
          f" in {summary['seconds']:.0f} s")
    print(f"data         {summary['data']['rows']} rows, steps/epoch {summary['data']['steps_per_epoch']}, "
          f"non-pad {100 * summary['data']['non_pad_fraction']:.1f}%")
    if fm:
        print(f"mean of the last {tail['logs']} logged steps "
              f"({tail['first_step']}-{tail['last_step']}):")
    for key in ("loss", "mle_loss", "rto_loss", "p_refusal", "tokens_per_sec", "mfu"):
        if key in fm:
            print(f"  {key:<14} {fm[key]:.4g}")
    if summary.get("loss_curve"):
        print(f"loss curve   {summary['loss_curve']}")
    print(f"export       python -m derta_jax.export --workdir={summary['workdir']} --out=HF_DIR")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
