"""`python -m derta_jax.train --config=configs/X.py [--config.a.b=v ...]`

Trains, checkpoints into --config.workdir, and resumes from its latest checkpoint when
started again with the same command.
"""

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


def _unknown_field(err: Exception, argv: list) -> str | None:
    """`--config.a.b: no field 'b'; did you mean ...` for the error ml_collections raises
    (AttributeError or KeyError, its "did you mean" suggestion inside) when an override names
    no field of the config; None when the error names no override of argv."""
    while err.args and isinstance(err.args[0], BaseException):  # AttributeError(KeyError(..))
        err = err.args[0]
    text = str(err.args[0]) if err.args else ""
    key, _, hint = text.partition("\n")
    key = key.strip("'\"")
    for arg in argv[1:]:
        name = arg.split("=", 1)[0].lstrip("-")
        if name.startswith("config.") and key in name.split(".")[1:]:
            hint = hint.strip()
            return (f"--{name}: no field {key!r} in the config"
                    + (f"; {hint[:1].lower()}{hint[1:]}" if hint else ""))
    return None


def _parse_flags(argv: list) -> list:
    """absl's flag parsing, with a bad flag or --config override as one line `error: ...` and
    exit status 2 (absl would print its usage and exit 1; ml_collections a traceback)."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.keys()  # a recipe file that failed to load raises on first use: now
        return rest
    except flags.Error as err:
        message = str(err)
    except OSError as err:  # ml_collections: "Failed loading config file ...[Errno 2] ..."
        message = f"--config: {str(err).strip().splitlines()[-1].strip()}"
    except (AttributeError, KeyError) as err:
        message = _unknown_field(err, argv)
        if message is None:
            raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def cli() -> None:
    """The console-script entry point (pyproject [project.scripts]), = python -m."""
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    cli()
