"""Where training progress goes: `metrics.jsonl`, TensorBoard events and a tqdm bar.

Only the main process (index 0) writes; the others get a writer that does nothing. On resume
from step s, records after s (written by the interrupted run after its last checkpoint) are
dropped from `metrics.jsonl` and purged from the TensorBoard events, so the files read as one
uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm

from aia_jax.fileio import write_atomically

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"


def note(message: str) -> None:
    """A line for the user: logged, and printed by the main process when INFO is not shown."""
    from absl import logging

    logging.info("%s", message)
    if jax.process_index() == 0 and not logging.level_info():
        tqdm.tqdm.write(message)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        value = value.item()
    return value


class MetricWriter:
    """Appends `{"step": s, **scalars}` lines to `metrics.jsonl` and scalars to TensorBoard."""

    def __init__(self, workdir: str, *, resume_step: int = 0):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        _truncate_after(self.path, resume_step)
        self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        from tensorboardX import SummaryWriter

        # Events of a run that stopped after `resume_step` (after step 0: one that crashed
        # before its first checkpoint) are hidden, as its metrics.jsonl lines are dropped.
        self._tb = SummaryWriter(os.path.join(workdir, TB_DIR), purge_step=resume_step + 1)

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.active:
            self._file.close()
            self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    """Drops records with a step above `step` (atomically rewriting the file)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a crash (or a full disk) mid-write
            from absl import logging

            logging.warning("%s: dropping a damaged line: %.80s", path, line.strip())
            continue
        if record.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep == lines:
        return
    write_atomically(path, "".join(keep))


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of a workdir's `metrics.jsonl`, in order."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A tqdm bar over optimiser steps on the main process: ETA, clips/s, loss, lr, top-1."""

    def __init__(self, total_steps: int, initial_step: int, clips_per_step: int):
        self.active = jax.process_index() == 0
        self.clips_per_step = clips_per_step
        self._last = (initial_step, time.perf_counter())
        if self.active:
            self._bar = tqdm.tqdm(
                total=total_steps,
                initial=initial_step,
                unit="step",
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def update(self, step: int, **postfix: Any) -> float:
        """Moves the bar to `step`; returns clips/s since the previous call."""
        last_step, last_time = self._last
        now = time.perf_counter()
        rate = (step - last_step) * self.clips_per_step / max(now - last_time, 1e-9)
        self._last = (step, now)
        if self.active:
            shown = {"clips/s": f"{rate:.1f}"}
            shown.update({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()})
            # Before the move, which redraws the bar: set after it, the figures would show one
            # interval late.
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(step - self._bar.n)
        return rate

    def restart_clock(self) -> None:
        """Times the next interval's clips/s from now: after the first step, whose call runs the
        step for the first time (slower, presumably the heap growing to the step's size; not
        measured apart), so that the first rate is the steps' own."""
        self._last = (self._last[0], time.perf_counter())

    def write(self, message: str) -> None:
        if self.active:
            tqdm.tqdm.write(message)

    def close(self) -> None:
        if self.active:
            self._bar.close()
