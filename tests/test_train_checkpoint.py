"""Checkpoints' own behaviour that the end-to-end runs do not show."""

import logging

import numpy as np
from absl import logging as absl_logging

from aia_jax.train import checkpoint
from aia_jax.train.checkpoint import Checkpoints
from aia_jax.train.step import TrainState


def _state(step: int) -> TrainState:
    return TrainState(
        step=np.int32(step),
        params={"w": np.full((2, 3), step, np.float32)},
        batch_stats={},
        opt_state={},
        rng=np.zeros(2, np.uint32),
    )


def test_periodic_save_without_metrics_is_quiet_and_not_best(tmp_path, caplog):
    ckpts = Checkpoints(str(tmp_path), async_save=False)
    with caplog.at_level(logging.WARNING):
        assert ckpts.save(1, _state(1), None)
        assert ckpts.save(2, _state(2), None, metrics={"val_top1": 0.5})
        assert not ckpts.save(2, _state(2), None)  # already saved
        absl_logging.warning("still shown")
    ckpts.close()
    messages = [r.getMessage() for r in caplog.records]
    assert checkpoint._NO_METRICS_WARNING not in messages
    assert "still shown" in messages  # the filter is gone after the save
    assert logging.getLogger("absl").filters == []
    reopened = Checkpoints(str(tmp_path), read_only=True)
    assert reopened.all_steps() == [1, 2] and reopened.best_step() == 2
    assert reopened.metrics(1) is None
