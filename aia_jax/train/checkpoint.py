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

A writable manager (a training run) holds an exclusive lock on `<workdir>/.train.lock` (taken by
process 0) until it is closed, so that a second run started on the same workdir stops with a
one-line error instead of removing the first one's half-written saves and racing it for steps.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from aia_jax import modelio
from aia_jax.errors import InputNotFoundError, UserError, one_line
from aia_jax.train.step import TrainState

CHECKPOINT_DIR = "checkpoints"
BEST_METRIC = "val_top1"
STATE, DATA_ITER = "state", "data_iter"
METRICS_ITEM = "metrics"  # Orbax's own item: `<step>/metrics/metrics`, JSON
LOCK_FILE = ".train.lock"
_ITER_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")
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


def _state_handler() -> ocp.StandardCheckpointHandler:
    """Orbax's handler for the state, writing each replicated array from one replica.

    Orbax's default array handler (0.11-0.12; on every platform unless JAX_PLATFORMS names a
    GPU) saves "replica-parallel": it cuts each replicated array into one slice per device that
    holds a copy, a separately compiled `lax.slice` per slice, all before `save` returns. A
    data-parallel state is replicated on every device, so with 8 devices a save blocks the
    training loop for 8 slices of every array, and the first one also compiles 8 slices of every
    shape: a TSM+CinST ResNet-50 state (942 arrays) on 8 CPU devices blocked for 7-11 s at the
    first save and 0.9-1.5 s at each later one, against 0.3-0.5 s and 0.15-0.2 s written from
    one replica (bench/RESULTS.md §8). What replica-parallel saves is write bandwidth in the
    asynchronous part, which a ResNet's few hundred MB does not need. The files are the same
    either way, and so is the handler's name in the checkpoint's metadata.
    """
    handler = ocp.StandardCheckpointHandler()
    th = ocp.type_handlers
    try:
        from orbax.checkpoint._src.metadata import array_metadata_store  # noqa: PLC0415

        arrays = th.ArrayHandler(
            use_replica_parallel=False, array_metadata_store=array_metadata_store.Store()
        )
    except (ImportError, TypeError):  # an Orbax without these: its default handler
        return handler
    # Orbax's registered handlers for everything else the state may hold.
    others = (int, float, bytes, np.number, np.ndarray, str)
    registry = th.create_type_handler_registry(
        *((t, th.get_type_handler(t)) for t in others), (jax.Array, arrays)
    )
    if hasattr(handler, "_impl"):  # what StandardCheckpointHandler() wraps, with its settings
        handler._impl = ocp.PyTreeCheckpointHandler(
            save_concurrent_gb=96, restore_concurrent_gb=96, type_handler_registry=registry
        )
    return handler


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


class CheckpointReadError(ValueError):
    """A checkpoint's files could not be read (Orbax reports some read failures as a bare
    `Exception`); the message is the innermost cause's, on one line."""


def _root_message(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    return one_line(error)


class _WorkdirLock:
    """An exclusive `flock` on `<workdir>/.train.lock`, held by process 0 of a training run.

    The kernel drops it when the process ends, however it ends (SIGKILL included), so a crashed
    run leaves nothing to clean up. On a filesystem without locks, runs are not guarded (a
    warning says so).
    """

    def __init__(self, workdir: str):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, LOCK_FILE)
        self._file = open(self.path, "a+")  # noqa: SIM115 (closed in release())
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = " ".join(self._file.read().split()) or "another process"
            self.release()
            raise UserError(
                f"{workdir}: another run is training in this workdir ({holder} holds "
                f"{self.path}); wait for it to end or stop it, or use a new workdir"
            ) from None
        except OSError as e:  # e.g. ENOLCK on a filesystem without locks
            logging.getLogger("absl").warning(
                "%s: cannot lock (%s); nothing stops a second run in this workdir", self.path, e
            )
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # drops the lock


def _lock_workdir(workdir: str) -> _WorkdirLock | None:
    """Process 0 locks the workdir; every process raises the same UserError when it is taken."""
    lock, message = None, ""
    if jax.process_index() == 0:
        try:
            lock = _WorkdirLock(workdir)
        except UserError as e:
            message = str(e)
        except OSError as e:  # e.g. no permission to create the workdir
            message = f"{workdir}: cannot write into this workdir ({one_line(e)})"
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        taken = bool(multihost_utils.broadcast_one_to_all(np.int32(bool(message))))
        if taken and not message:
            message = (
                f"{workdir}: another run is training in this workdir (process 0 found it "
                "locked); wait for it to end or stop it, or use a new workdir"
            )
    if message:
        raise UserError(message)
    return lock


class Checkpoints:
    """Saves and restores `(TrainState, data iterator)` pairs of a training workdir."""

    def __init__(
        self, workdir: str, *, keep: int = 2, async_save: bool = True, read_only: bool = False
    ):
        self.directory = checkpoint_dir(workdir)
        self._closed = False
        # Before the manager is opened: opening it removes temporaries, another run's included.
        self._lock = None if read_only else _lock_workdir(os.path.abspath(workdir))
        try:
            self.manager = self._open(keep, async_save, read_only)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    def _open(self, keep: int, async_save: bool, read_only: bool) -> ocp.CheckpointManager:
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
            registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
            state_handler = _state_handler()
            registry.add(STATE, ocp.args.StandardSave, state_handler)
            registry.add(STATE, ocp.args.StandardRestore, state_handler)
            registry.add(DATA_ITER, grain.checkpoint.CheckpointSave)
            registry.add(DATA_ITER, grain.checkpoint.CheckpointRestore)
            try:  # reads every checkpoint's metrics
                return ocp.CheckpointManager(
                    self.directory, options=options, handler_registry=registry
                )
            except (ValueError, OSError) as e:
                raise UserError(self._unopenable(e)) from None

    def _unopenable(self, error: Exception) -> str:
        """Names the checkpoint whose metrics file cannot be read, or else the directory."""
        try:
            steps = sorted((n for n in os.listdir(self.directory) if n.isdigit()), key=int)
        except OSError:
            steps = []
        for step in steps:
            path = os.path.join(self.directory, step, METRICS_ITEM, METRICS_ITEM)
            try:
                if os.path.exists(path):
                    with open(path) as f:
                        json.load(f)
            except (OSError, ValueError) as e:
                return (
                    f"{path}: cannot read this checkpoint's metrics, it is damaged "
                    f"({one_line(e)[:200]}); move {os.path.join(self.directory, step)} out of "
                    f"{self.directory}"
                )
        return f"{self.directory}: cannot open the checkpoints ({one_line(error)[:200]})"

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
        """Restores the state (with the shardings of `abstract_state`) and the iterator.

        Raises:
          UserError: the iterator position was saved by another number of processes.
          CheckpointReadError (a ValueError), ValueError, KeyError, TypeError, OSError: the
            checkpoint cannot be read.
        """
        items = {STATE: ocp.args.StandardRestore(abstract_state.to_dict())}
        if data_iter is not None:
            self._check_process_count(step)
            items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            if type(e) is not Exception:
                raise
            # Orbax wraps TensorStore's read errors (a missing or truncated data file) so.
            raise CheckpointReadError(_root_message(e)) from e
        return TrainState.from_dict(restored[STATE])

    def _check_process_count(self, step: int) -> None:
        """Each process saves its own iterator position (`process_<i>-of-<n>.json`); a run with
        another number of processes has no position to resume from."""
        path = os.path.join(self.directory, str(step), DATA_ITER)
        try:
            names = os.listdir(path)
        except OSError:
            return  # missing: reported as a damaged checkpoint
        saved = {int(m.group(2)) for m in map(_ITER_FILE.fullmatch, names) if m}
        count = jax.process_count()
        if saved and count not in saved:
            was = ", ".join(str(n) for n in sorted(saved))
            raise UserError(
                f"{path}: the data position was saved by a run of {was} process(es), this run "
                f"has {count}; resume it with {was} processes (jax.distributed), or use a new "
                "workdir"
            )

    def state_differences(
        self, step: int, abstract_state: TrainState, *, only: tuple[str, ...] = ()
    ) -> list[str] | None:
        """How the state saved at `step` differs from `abstract_state` in leaves and shapes.

        Tells a checkpoint of another network or optimiser (other leaves) from a damaged one
        (the same leaves, unreadable data) when a restore fails.

        Args:
          step: the checkpoint.
          abstract_state: the state this run expects.
          only: compare only these fields of the state (e.g. `("params", "batch_stats")`);
            default all.

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
        if only:
            keep = lambda key: key.split("/", 1)[0] in only  # noqa: E731
            saved = {k: v for k, v in saved.items() if keep(k)}
            expected = {k: v for k, v in expected.items() if keep(k)}
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
        """Waits for pending saves, closes the manager and releases the workdir; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        finally:
            if self._lock is not None:
                self._lock.release()


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
