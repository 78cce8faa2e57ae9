"""Trains a network: `python train.py --config configs/<file>.py --workdir DIR`.

Config fields can be overridden on the command line, e.g. `--config.optimizer.lr=0.02`. A workdir
that holds checkpoints is resumed from its latest one. See configs/common.py for the fields.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from aia_jax import train, xla_cpu

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        # The progress bar and the validation lines are the normal output; `--verbosity=0`
        # shows the INFO log (batch geometry, learning-rate scaling, checkpoint I/O) as well.
        logging.set_verbosity(logging.WARNING)
    try:
        summary = train.run(_CONFIG.value, _WORKDIR.value)
    except train.NonFiniteLossError as e:
        # The checkpoints in the workdir are the last good ones; say so and fail the job.
        raise SystemExit(f"error: {e}") from None
    if "val_top1" in summary:
        print(
            f"Finished at step {summary['step']}: val top-1 {summary['val_top1']:.4f}, "
            f"top-5 {summary['val_top5']:.4f} over {summary['val_count']} videos "
            f"(1 clip × 1 centre crop); best checkpoint: step {summary['best_step']} in "
            f"{_WORKDIR.value}"
        )
    else:
        print(f"Stopped at step {summary['step']} (preempted: {summary['preempted']}).")


if __name__ == "__main__":
    # XLA reads XLA_FLAGS when the first backend is created, not when jax is imported.
    xla_cpu.apply_cpu_flags()
    app.run(main)
