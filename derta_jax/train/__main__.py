"""`python -m derta_jax.train --config=configs/X.py [--config.a.b=v ...]`

Trains, checkpoints into --config.workdir, and resumes from its latest checkpoint when
started again with the same command.
"""

import logging
import sys

from absl import app
from ml_collections import config_flags

from derta_jax import cli_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A recipe file in configs/.",
                                          lock_config=True)


def main(argv):
    del argv  # cli_flags refuses positional arguments
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


def cli() -> None:
    """The console-script entry point (pyproject [project.scripts]), = python -m."""
    app.run(main, flags_parser=cli_flags.config_parser(_CONFIG))


if __name__ == "__main__":
    cli()
