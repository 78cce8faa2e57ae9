"""Resume edge cases that need no training: a workdir in use by another run, a checkpoint of
another process count, damaged metrics or array data. Checkpoints are written from small
hand-made states; `train.run` stops at its resume checks, before compiling anything."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from aia_jax import train
from aia_jax.errors import UserError
from aia_jax.train.checkpoint import CheckpointReadError, Checkpoints
from aia_jax.train.step import TrainState
from tests.test_train_run import ROOT, env, tiny_config  # noqa: F401 (env: a fixture)


def _state(step: int) -> TrainState:
    # Random values: Orbax stores well-compressing small arrays inline in the metadata files.
    w = np.random.default_rng(step).standard_normal((256, 256), np.float32)
    return TrainState(
        step=np.int32(step),
        params={"w": jax.device_put(w)},
        batch_stats={},
        opt_state={},
        rng=np.zeros(2, np.uint32),
    )


def _save(workdir: str, *steps: int, metrics: bool = False) -> None:
    ckpts = Checkpoints(workdir, async_save=False, keep=10)
    for s in steps:
        assert ckpts.save(s, _state(s), None, metrics={"val_top1": s / 10} if metrics else None)
    ckpts.close()


def test_a_workdir_in_use_by_another_process_is_refused(tmp_path):
    """Two runs in one workdir would remove each other's half-written saves (Orbax cleans up
    temporaries when a manager opens) and write the same steps: the second one is refused."""
    workdir = str(tmp_path / "w")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys
                from aia_jax.train.checkpoint import Checkpoints
                c = Checkpoints({workdir!r})
                print("ready", flush=True)
                sys.stdin.read()
                c.close()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(UserError) as e:
            Checkpoints(workdir)
        message = str(e.value)
        assert message.startswith(f"{workdir}: another run is training in this workdir (pid ")
        assert f"{workdir}/.train.lock" in message and "\n" not in message
        Checkpoints(workdir, read_only=True).close()  # reading it (evaluate, predict) is fine
    finally:
        holder.communicate("", timeout=60)
    Checkpoints(workdir).close()  # free again once the other run ended
    # Also in one process: a second writable manager waits for the first to be closed.
    first = Checkpoints(workdir)
    with pytest.raises(UserError, match="another run is training"):
        Checkpoints(workdir)
    first.close()
    first.close()  # idempotent
    Checkpoints(workdir).close()


def test_run_refuses_a_workdir_in_use_and_frees_it_when_it_fails(env, tmp_path):  # noqa: F811
    workdir = str(tmp_path / "w")
    other = Checkpoints(workdir)
    with pytest.raises(UserError, match=r"another run is training in this workdir"):
        train.run(tiny_config(env["data_dir"]), workdir)
    other.close()
    assert not os.path.exists(os.path.join(workdir, "config.json"))  # nothing overwritten

    # A run that stops at a resume check (here: another batch size) leaves the workdir free,
    # e.g. for the corrected command in the same notebook.
    _save(workdir, 1)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"batch_size": 8}, f)
    with pytest.raises(UserError, match="has batch_size 8"):
        train.run(tiny_config(env["data_dir"]), workdir)
    Checkpoints(workdir).close()


def test_resume_with_another_process_count_is_refused_in_one_line(env, tmp_path):  # noqa: F811
    """Each process saves its own data position; with another number of processes there is
    none to resume from, in this checkpoint or any earlier one: not "damaged", and no fallback."""
    workdir = str(tmp_path / "w")
    _save(workdir, 2, 3)
    for step in (2, 3):
        folder = os.path.join(workdir, "checkpoints", str(step), "data_iter")
        os.makedirs(folder)
        for i in range(2):
            with open(os.path.join(folder, f"process_{i}-of-2.json"), "w") as f:
                json.dump({"next_index": 16 * step}, f)
    with pytest.raises(UserError) as e:
        train.run(tiny_config(env["data_dir"]), workdir)
    assert str(e.value) == (
        f"{workdir}/checkpoints/3/data_iter: the data position was saved by a run of 2 "
        "process(es), this run has 1; resume it with 2 processes (jax.distributed), or use a "
        "new workdir"
    )


@pytest.mark.parametrize("read_only", [False, True])
def test_a_damaged_metrics_file_is_named(tmp_path, read_only):
    """Orbax reads every checkpoint's metrics when it opens the directory (for training,
    evaluation and prediction alike)."""
    workdir = str(tmp_path / "w")
    _save(workdir, 1, 2, metrics=True)
    path = os.path.join(workdir, "checkpoints", "2", "metrics", "metrics")
    with open(path, "w") as f:
        f.write('{"val_top1": 0.')
    with pytest.raises(UserError) as e:
        Checkpoints(workdir, read_only=read_only)
    message = str(e.value)
    assert message.startswith(f"{path}: cannot read this checkpoint's metrics, it is damaged (")
    assert message.endswith(f"move {workdir}/checkpoints/2 out of {workdir}/checkpoints")
    if not read_only:
        shutil.rmtree(os.path.dirname(os.path.dirname(path)))
        Checkpoints(workdir).close()  # the failed open released the workdir


def test_unreadable_array_data_is_a_value_error_with_tensorstores_reason(tmp_path):
    """Orbax raises a bare `Exception` ("Encountered error while reading array index …") when
    an array's data file is missing or cut short; the trainer reports ValueErrors as a damaged
    checkpoint (naming it and the step to fall back to), a bare Exception escaped as a
    traceback."""
    workdir = str(tmp_path / "w")
    _save(workdir, 1)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "1", "state", "ocdbt.process_0"))
    ckpts = Checkpoints(workdir)
    try:
        with pytest.raises(CheckpointReadError, match="ocdbt|OCDBT|Error reading") as e:
            ckpts.restore(1, jax.eval_shape(lambda: _state(1)), None)
        assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    finally:
        ckpts.close()


def test_a_checkpoint_past_the_configs_end_is_refused(env, tmp_path):  # noqa: F811
    """With fewer epochs than the run in the workdir took (here 12 steps, saved 20), the loop
    would not run and the run would report itself finished at step 20."""
    workdir = str(tmp_path / "w")
    _save(workdir, 20)
    with pytest.raises(UserError) as e:
        train.run(tiny_config(env["data_dir"]), workdir)
    assert str(e.value) == (
        f"{workdir}/checkpoints/20: the run in this workdir is past this config's last step 12 "
        "(num_epochs 3 × 4 steps per epoch); resume with a larger --config.num_epochs, or use "
        "a new workdir"
    )


def test_checkpoints_of_another_network_without_model_json_are_named_so(env, tmp_path):  # noqa: F811
    """Only `checkpoints/` copied (no model.json to compare with): the message blames the
    network, whose tensors differ, not the optimiser."""
    workdir = str(tmp_path / "w")
    _save(workdir, 2)  # params {'w': (256, 256)}: not this config's network
    with pytest.raises(UserError) as e:
        train.run(tiny_config(env["data_dir"]), workdir)
    message = str(e.value)
    assert message.startswith(
        f"{workdir}/checkpoints/2: cannot resume it with this config (the network differs "
        "from the run that wrote it: 1 leaves saved but not in this config's state, e.g. "
        "params/w; "
    )
    assert "opt_state" not in message and "\n" not in message


def test_a_changed_num_epochs_is_noted_on_resume(env, tmp_path, monkeypatch):  # noqa: F811
    """Training on with another length is allowed, but said: a cosine schedule re-spans it."""
    import importlib

    run_module = importlib.import_module("aia_jax.train.run")
    notes: list[str] = []
    monkeypatch.setattr(run_module, "note", notes.append)
    workdir = str(tmp_path / "w")
    _save(workdir, 2)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"batch_size": 16, "num_epochs": 2.0}, f)
    c = tiny_config(env["data_dir"])
    c.optimizer.schedule = "cosine"
    with pytest.raises(UserError, match="network differs"):  # a hand-made state: stops there
        train.run(c, workdir)
    assert (
        "num_epochs 2 → 3 since the run in this workdir started: it now ends at step 12; the "
        "cosine schedule spans the new length from here on"
    ) in notes
    notes.clear()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"batch_size": 16, "num_epochs": 3.0}, f)
    with pytest.raises(UserError, match="network differs"):
        train.run(c, workdir)
    assert not [n for n in notes if n.startswith("num_epochs")]


def _record(workdir: str, config) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(json.loads(config.to_json_best_effort()), f)


def test_resume_with_another_seed_or_training_set_is_refused(env, tmp_path):  # noqa: F811
    """The saved data position counts examples of the recorded training set in its seed's
    shuffle: with another set or seed it would silently index other examples."""
    workdir = str(tmp_path / "w")
    _save(workdir, 1)
    recorded = tiny_config(env["data_dir"])
    recorded.seed = 3
    _record(workdir, recorded)
    with pytest.raises(UserError) as e:
        train.run(tiny_config(env["data_dir"]), workdir)
    assert str(e.value) == (
        f"{workdir}/config.json: the run in this workdir trained on seed 3, this config 0 (the "
        "saved data position is a place in its shuffle); resume with --config.seed=3, or use a "
        "new workdir"
    )
    recorded.seed = 0
    recorded.data.synthetic_num_train = 48
    _record(workdir, recorded)
    with pytest.raises(UserError, match=r"trained on data.synthetic_num_train 48, this config 64"):
        train.run(tiny_config(env["data_dir"]), workdir)
    Checkpoints(workdir).close()  # freed by the refused runs


def _frames_config(root: str, **data):
    from aia_jax.train import config as config_lib

    c = config_lib.get_config()
    c.data.source, c.data.preset, c.data.root = "frames", "something_v1", root
    c.data.update(data)
    return c


def _check_same_data(monkeypatch, workdir: str, recorded, config) -> list[str]:
    """`run._check_same_data` of `config` against `recorded`; returns the notes it gave."""
    import importlib

    run_module = importlib.import_module("aia_jax.train.run")
    _record(workdir, recorded)
    notes: list[str] = []
    monkeypatch.setattr(run_module, "note", notes.append)
    run_module._check_same_data(workdir, config)
    return notes


def test_resume_names_the_training_data_field_that_changed(tmp_path, monkeypatch):
    """Fields that decide the training examples are compared as the user wrote them (a preset's
    values count as the preset's); another spelling of the same path, or a field that only
    changes evaluation or speed, may change."""
    workdir, root = str(tmp_path), str(tmp_path / "data")
    os.makedirs(root)
    recorded = _frames_config(root)
    refused = {
        "data.preset 'something_v1', this config 'something_v2'": _frames_config(
            root, preset="something_v2"
        ),
        "data.train_list 'train_videofolder.txt', this config 'mine.txt'": _frames_config(
            root, train_list="mine.txt"
        ),
        f"data.root '{root}', this config '{tmp_path}'": _frames_config(str(tmp_path)),
        "data.source 'frames', this config 'videos'": _frames_config(root, source="videos"),
        "data.media_dir '20bn-something-something-v1', this config 'frames'": _frames_config(
            root, media_dir="frames"
        ),
    }
    for expected, config in refused.items():
        with pytest.raises(UserError) as e:
            _check_same_data(monkeypatch, workdir, recorded, config)
        key, value = expected.split(",")[0].split(" ")  # e.g. data.preset 'something_v1'
        assert str(e.value) == (
            f"{workdir}/config.json: the run in this workdir trained on {expected} (the saved "
            f"data position counts examples of that training set); resume with --config.{key}="
            f"{value}, or use a new workdir"
        )
    # The same training set, spelt otherwise, and fields that only change evaluation or speed.
    monkeypatch.chdir(tmp_path)
    same = [
        _frames_config("data"),  # relative
        _frames_config(root + "/", train_list="train_videofolder.txt"),  # the preset's own
        _frames_config(root, train_list=os.path.join(root, "train_videofolder.txt")),
        _frames_config(root, val_list="other.txt", num_workers=0, prefetch_buffer=8),
    ]
    for config in same:
        assert _check_same_data(monkeypatch, workdir, recorded, config) == []
    # A data set staged at another place (its recorded root gone): said, not refused.
    moved = _frames_config(str(tmp_path / "gone"))
    notes = _check_same_data(monkeypatch, workdir, moved, recorded)
    assert notes == [
        f"data.root '{tmp_path}/gone' → '{root}' since the run in this workdir started (the old "
        "one is gone): resuming on the assumption that the data set moved"
    ]
    # TFDS: its name, split and folder.
    tfds = _frames_config("", source="tfds", preset="", tfds_name="ucf101", data_dir=root)
    for field, value in (("tfds_name", "hmdb51"), ("train_split", "train[:50%]")):
        other = _frames_config("", source="tfds", preset="", tfds_name="ucf101", data_dir=root)
        other.data[field] = value
        with pytest.raises(UserError, match=f"trained on data.{field} "):
            _check_same_data(monkeypatch, workdir, tfds, other)
    tfds_default = _frames_config("", source="tfds", preset="", tfds_name="ucf101")
    with pytest.raises(UserError, match=re.escape(f"data.data_dir '{root}', this config ''")):
        _check_same_data(monkeypatch, workdir, tfds, tfds_default)
