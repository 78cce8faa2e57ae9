"""Two processes on 127.0.0.1 (`jax.distributed.initialize`, 2 fake CPU devices each) train the
default recipe (on the plain TSM) for a few steps, validate, and agree with one process holding
4 devices."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from aia_jax import modelio
from aia_jax.errors import UserError
from aia_jax.train.checkpoint import Checkpoints
from aia_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(data_dir):
    from tests import test_train_run as t

    c = t.tiny_config(data_dir)
    c.model.name = "TSM"  # what is tested is the hosts' agreement, not the attention
    c.num_epochs = 0.75  # 3 steps of 16 clips
    # One validation, at the end: 24 videos in 2 batches of 16, padded unevenly over the
    # processes (8 rows each): the second batch is process 0's last 8 videos and 8 padding rows
    # on process 1.
    c.eval_every_epochs = 0.75
    c.eval_batch_size = 16
    return c


def launch(workdir, data_dir, devices, distributed=""):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        from aia_jax.train import run
        import test_train_multiprocess as t
        c = t.tiny_config({data_dir!r})
        {distributed}
        print("SUMMARY", run(c, {workdir!r}), flush=True)
    """)
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    from aia_jax.data import synthetic

    data_dir = str(tmp_path / "tfds")
    synthetic.prepare(data_dir, 64, 24, 0)
    port = free_port()
    multi = str(tmp_path / "multi")
    procs = [launch(multi, data_dir, 2, distributed_settings(port, i)) for i in range(2)]
    single = str(tmp_path / "single")
    procs.append(launch(single, data_dir, 4))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert "'step': 3" in out, out

    a, meta = modelio.load_model(multi, step=3)
    b, _ = modelio.load_model(single, step=3)
    assert meta["step"] == 3
    diff = sum(float(((x - y) ** 2).sum()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    norm = sum(float((x**2).sum()) for x in jax.tree.leaves(a))
    assert np.sqrt(diff / norm) < 1e-5
    ma, mb = read_metrics(multi), read_metrics(single)
    train_a, train_b = ([r for r in m if "train/loss" in r] for m in (ma, mb))
    assert [r["step"] for r in train_a] == [1, 2, 3]  # written once, by process 0
    np.testing.assert_allclose(
        [r["train/loss"] for r in train_a], [r["train/loss"] for r in train_b], rtol=1e-5
    )
    val_a, val_b = ([r for r in m if "val/loss" in r] for m in (ma, mb))
    assert [(r["step"], r["val/count"]) for r in val_a] == [(3, 24)]  # every video, once
    for key in ("val/loss", "val/top1", "val/top5"):
        np.testing.assert_allclose(val_a[0][key], val_b[0][key], rtol=1e-5)
    # Each process saved its own data-iterator position.
    names = sorted(os.listdir(os.path.join(multi, "checkpoints", "3", "data_iter")))
    assert [n for n in names if n.endswith(".json")] == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    # ... so one process cannot resume it: said in one line, not as a damaged checkpoint.
    from aia_jax import train

    with pytest.raises(UserError, match=r"checkpoints/3/data_iter: .* saved by a run of 2 proc"):
        train.run(tiny_config(data_dir), multi)


def distributed_settings(port, i):
    return (
        f"c.distributed.coordinator_address = '127.0.0.1:{port}'\n"
        f"        c.distributed.num_processes = 2\n"
        f"        c.distributed.process_id = {i}"
    )


def test_two_processes_refuse_a_workdir_in_use(tmp_path):
    """Process 0 finds the workdir locked by another run; both processes stop with its message
    (process 1 must not go on alone into the restore's collectives and hang)."""
    from aia_jax.data import synthetic

    data_dir = str(tmp_path / "tfds")
    synthetic.prepare(data_dir, 64, 24, 0)
    workdir = str(tmp_path / "w")
    other = Checkpoints(workdir)
    try:
        port = free_port()
        procs = [launch(workdir, data_dir, 1, distributed_settings(port, i)) for i in range(2)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        other.close()
    for p, out in zip(procs, outs):
        assert p.returncode != 0, out
        assert "another run is training in this workdir" in out.strip().splitlines()[-1], out
    assert not os.path.exists(os.path.join(workdir, "config.json"))
