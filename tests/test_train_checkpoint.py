"""Checkpoints' own behaviour that the end-to-end runs do not show."""

import json
import logging
import os
import time

import jax
import numpy as np
from absl import logging as absl_logging

from aia_jax.train import checkpoint
from aia_jax.train import mesh as mesh_lib
from aia_jax.train import step as step_lib
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


def test_a_replicated_state_is_saved_without_compiling_slices(tmp_path):
    """On 8 devices a replicated state is written from one replica: Orbax's default cuts every
    array into 8 slices, each a compiled `lax.slice`, before `save` returns. The checkpoint
    records the same handler as Orbax's own and reads back equal."""
    mesh = mesh_lib.make_mesh(jax.devices())
    assert mesh.size == 8
    # Shapes no other test compiles a slice of, so that a compile cannot come from a cache.
    state = _state(3).replace(
        params={"w": np.arange(7 * 13 * 8, dtype=np.float32).reshape(7, 13, 8)}
    )
    sharding = step_lib.state_sharding(state, mesh)
    state = jax.device_put(state, sharding)
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    # A program no compilation cache holds (its constant is new): the listener must hear it.
    probe = float(time.time_ns() % 1_000_003)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.jit(lambda x: x * probe)(np.ones(3, np.float32))
        ckpts = Checkpoints(str(tmp_path))
        assert ckpts.save(3, state, None)
        ckpts.wait()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(compiles) == 1  # the probe's; the save compiled nothing
    with open(os.path.join(ckpts.directory, "3", "_CHECKPOINT_METADATA")) as f:
        handlers = json.load(f)["item_handlers"]
    assert handlers["state"].endswith("standard_checkpoint_handler.StandardCheckpointHandler")
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, sharding
    )
    restored = ckpts.restore(3, abstract, None)
    ckpts.close()
    np.testing.assert_array_equal(restored.params["w"], np.asarray(state.params["w"]))
    assert restored.params["w"].sharding.is_equivalent_to(sharding.params["w"], 3)
