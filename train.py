"""Trains a network: `python train.py --config configs/<file>.py --workdir DIR`.

Config fields can be overridden on the command line, e.g. `--config.optimizer.lr=0.02`. A workdir
that holds checkpoints is resumed from its latest one. See configs/common.py for the fields.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from aia_jax import compilation_cache, train, xla_cpu
from aia_jax.errors import (
    load_config_flag,
    one_line,
    reported_as_usage_errors,
    unknown_override,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
flags.mark_flags_as_required(["config", "workdir"])


PROGRAM = "train.py"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a one-line error for an unknown `--config.x` override."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"{PROGRAM}: error: {one_line(e)}", file=sys.stderr)
    except (AttributeError, KeyError) as e:  # ml_collections: no such config field
        print(f"{PROGRAM}: error: {unknown_override(e, argv)}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        # The progress bar and the validation lines are the normal output; `--verbosity=0`
        # shows the INFO log (batch geometry, learning-rate scaling, checkpoint I/O) as well.
        logging.set_verbosity(logging.WARNING)
    with reported_as_usage_errors(PROGRAM):
        config = load_config_flag(_CONFIG, sys.argv)
        try:
            # Only as the program itself: its command line then reproduces the run.
            summary = train.run(config, _WORKDIR.value, may_restart=__name__ == "__main__")
        except train.NonFiniteLossError as e:
            # The checkpoints in the workdir are the last good ones; say so and fail the job.
            raise SystemExit(f"{PROGRAM}: error: {e}") from None
    step = summary["step"]
    if summary["preempted"]:
        print(f"Preempted at step {step}: resume with the same command.")
    elif "val_top1" in summary:
        print(
            f"Finished at step {step}: val top-1 {summary['val_top1']:.4f}, "
            f"top-5 {summary['val_top5']:.4f} over {summary['val_count']} videos "
            f"(1 clip × 1 centre crop); best checkpoint: step {summary['best_step']} in "
            f"{_WORKDIR.value}"
        )
    else:
        best = summary["best_step"]
        print(
            f"Finished at step {step} in {_WORKDIR.value}; no validation ran in this invocation"
            + (f" (best checkpoint: step {best})." if best is not None else ".")
        )


if __name__ == "__main__":
    # XLA reads XLA_FLAGS when the first backend is created, not when jax is imported.
    xla_cpu.apply_cpu_flags()
    compilation_cache.use_default()
    app.run(main, flags_parser=parse_flags)
