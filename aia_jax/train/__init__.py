"""The trainer: `run(config, workdir)` and its parts (mesh, optimiser, step, checkpoints)."""

from aia_jax.train.run import NonFiniteLossError, run

__all__ = ["NonFiniteLossError", "run"]
