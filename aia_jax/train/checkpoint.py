"""Training checkpoints: an Orbax `CheckpointManager` in `<workdir>/checkpoints`.

Layout: `<workdir>/checkpoints/<step>/` with items
- `state/`: the whole `TrainState` (step, params, batch_stats, opt_state, rng), Orbax arrays;
- `data_iter/`: the grain iterator position, one `process_<i>-of-<n>.json` per process;
- `metrics/`: `{"val_top1": ...}` on steps where validation ran.

Saves are asynchronous (arrays are copied to host memory before `save` returns, so the donated
state can move on) and atomic: Orbax writes into a temporary directory and renames it when
complete, so a crash mid-save leaves the previous checkpoint as the latest usable one; stale
temporaries are removed when the manager is next opened. Kept: the newest `keep` checkpoints
plus the best one by validation top-1.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from aia_jax import modelio
from aia_jax.errors import InputNotFoundError
from aia_jax.train.step import TrainState

CHECKPOINT_DIR = "checkpoints"
BEST_METRIC = "val_top1"
STATE, DATA_ITER = "state", "data_iter"
# Orbax warns at every save without metrics once a best-metric is tracked. Periodic saves carry
# none on purpose (they never compete for "best"), so that one message is dropped around them.
_NO_METRICS_WARNING = "Requested `tracked_metric`; did not provide metrics."
# Reading a workdir (evaluate, predict, export) opens it read-only; Orbax warns that it is, and
# that the step's metadata file sits one level up. Neither says anything to the user.
_READ_ONLY_NOTICES = (
    "CheckpointManagerOptions.read_only=True",
    "Given directory is read only",
    "Metadata file does not exist",
)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextlib.contextmanager
def _without_orbax_warnings(*prefixes: str) -> Iterator[None]:
    absl_logger, drop = logging.getLogger("absl"), _DropMessages(prefixes)
    absl_logger.addFilter(drop)
    try:
        yield
    finally:
        absl_logger.removeFilter(drop)


def _best_fn(metrics: dict[str, Any]) -> float:
    return float(metrics[BEST_METRIC])


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


class Checkpoints:
    """Saves and restores `(TrainState, data iterator)` pairs of a training workdir."""

    def __init__(
        self, workdir: str, *, keep: int = 2, async_save: bool = True, read_only: bool = False
    ):
        with _without_orbax_warnings(*_READ_ONLY_NOTICES):
            options = ocp.CheckpointManagerOptions(
                best_fn=_best_fn,
                best_mode="max",
                preservation_policy=policies.AnyPreservationPolicy(
                    [
                        policies.LatestN(n=max(1, keep)),
                        policies.BestN(
                            get_metric_fn=_best_fn, n=1, keep_checkpoints_without_metrics=False
                        ),
                    ]
                ),
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=not read_only,
                create=not read_only,
                read_only=read_only,
            )
            self.directory = checkpoint_dir(workdir)
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=(STATE, DATA_ITER)
            )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best validation top-1 (None when nothing was evaluated)."""
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def metrics(self, step: int) -> dict[str, Any] | None:
        """The metrics saved with `step` (`{"val_top1": ...}`), or None."""
        return self.manager.metrics(step)

    def save(
        self,
        step: int,
        state: TrainState,
        data_iter: Any,
        *,
        metrics: dict[str, float] | None = None,
    ) -> bool:
        """Starts an asynchronous save of `state` and the iterator position at `step`.

        Returns False (and saves nothing) when `step` is already saved.
        """
        if step in self.manager.all_steps():
            return False
        items = {STATE: ocp.args.StandardSave(state.to_dict())}
        if data_iter is not None:
            items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
        quiet = (
            _without_orbax_warnings(_NO_METRICS_WARNING)
            if metrics is None
            else contextlib.nullcontext()
        )
        with quiet:
            return self.manager.save(
                step, args=ocp.args.Composite(**items), metrics=metrics, force=True
            )

    def restore(self, step: int, abstract_state: TrainState, data_iter: Any) -> TrainState:
        """Restores the state (with the shardings of `abstract_state`) and the iterator."""
        items = {STATE: ocp.args.StandardRestore(abstract_state.to_dict())}
        if data_iter is not None:
            items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return TrainState.from_dict(restored[STATE])

    def state_differences(self, step: int, abstract_state: TrainState) -> list[str] | None:
        """How the state saved at `step` differs from `abstract_state` in leaves and shapes.

        Tells a checkpoint of another optimiser (other leaves) from a damaged one (the same
        leaves, unreadable data) when a restore fails.

        Returns:
          `[]` when the saved leaves and shapes are those of `abstract_state`, else one line
          per kind of difference (with a count and an example); None when not even the
          checkpoint's metadata can be read.
        """
        path = os.path.join(self.directory, str(step), STATE)
        try:
            with _without_orbax_warnings(*_READ_ONLY_NOTICES), ocp.PyTreeCheckpointer() as ckptr:
                item = ckptr.metadata(path).item_metadata
        except Exception:  # noqa: BLE001 - Orbax raises many types for damaged metadata
            modelio.quiet_closed_event_loop()
            return None
        if item is None:
            return None
        saved, expected = _leaf_shapes(item.tree), _leaf_shapes(abstract_state.to_dict())
        kinds = {
            "saved but not in this config's state": [k for k in saved if k not in expected],
            "of this config's state not saved": [k for k in expected if k not in saved],
            "of another shape": [
                f"{k} {saved[k]} → {expected[k]}"
                for k in saved
                if k in expected and saved[k] != expected[k]
            ],
        }
        return [
            f"{len(keys)} leaves {kind}, e.g. {keys[0]}" for kind, keys in kinds.items() if keys
        ]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """`{'opt_state/1/trace/…': shape}` of a pytree's leaves (arrays, shapes or Orbax metadata).

    Orbax's metadata tree spells a namedtuple's fields as dict keys and a tuple's items as list
    items, so only the key's name or index is kept.
    """
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
        shapes["/".join(str(k) for k in keys)] = tuple(leaf.shape)
    return shapes


def restore_variables(workdir: str, *, step: int | None = None) -> tuple[dict[str, Any], int]:
    """Reads `params` and `batch_stats` of a workdir checkpoint as numpy arrays.

    Args:
      workdir: a training workdir.
      step: which checkpoint; default the best by validation top-1, else the latest.

    Returns:
      `({'params', 'batch_stats'}, step)`.
    """
    ckpts = Checkpoints(workdir, read_only=True)
    try:
        if step is None:
            step = ckpts.best_step()
            step = ckpts.latest_step() if step is None else step
        if step is None:
            raise InputNotFoundError(f"no checkpoint in {ckpts.directory}")
        steps = sorted(ckpts.all_steps())
        if step not in steps:  # Orbax would report it as a damaged checkpoint (no _METADATA)
            available = ", ".join(str(s) for s in steps) or "none"
            raise InputNotFoundError(
                f"step {step}: no such checkpoint in {ckpts.directory} "
                f"(available steps: {available})"
            )
        path = os.path.join(ckpts.directory, str(step), STATE)
        with _without_orbax_warnings(*_READ_ONLY_NOTICES):
            restored = modelio.restore_numpy(path, keys=("params", "batch_stats"))
    finally:
        ckpts.close()
    return restored, step
