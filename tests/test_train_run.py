"""End to end: `aia_jax.train.run` on the synthetic data — outputs, resume, preemption, failures.

Every run here uses the same tiny config (TSM_CinST_BN, depth 14, width 8, 4 frames of 32×32,
64 training videos, batch 16 over the 8 fake devices: 4 steps per epoch, 12 steps in all), and a
persistent compilation cache shared with the subprocesses, so that repeated runs compile once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from aia_jax import modelio, train
from aia_jax.errors import UserError
from aia_jax.train.checkpoint import Checkpoints
from aia_jax.train.metrics import Progress, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def tiny_config(data_dir: str):
    from configs import default

    c = default.get_config()
    c.data.data_dir = data_dir
    c.data.synthetic_num_train = 64
    c.data.synthetic_num_val = 24
    c.data.resize = (32, 32)
    c.data.crop_size = 32
    c.data.scales = (1.0, 0.875)
    c.data.num_segments = 4
    c.data.num_workers = 0
    c.model.width = 8
    c.batch_size = 16
    c.num_epochs = 3.0
    c.eval_every_epochs = 1.0
    c.checkpoint_every_steps = 2
    c.log_every_steps = 1
    c.keep_checkpoints = 2
    c.optimizer.warmup_epochs = 0.0
    return c


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """The synthetic dataset; every run of the session writes every program it compiles.

    The runs share conftest's compilation cache, which the subprocesses inherit: JAX reads its
    directory once, at the process's first compile, so a directory set here would be this
    process's in name only, and the subprocesses given it would compile every program again
    (~36 s each).
    """
    base = tmp_path_factory.mktemp("train_run")
    data_dir = str(base / "tfds")
    from aia_jax.data import synthetic

    synthetic.prepare(data_dir, 64, 24, 0)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return {"data_dir": data_dir}


@pytest.fixture(scope="session")
def reference(env, tmp_path_factory):
    """One uninterrupted run: the workdir every interrupted run is compared with."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    summary = train.run(tiny_config(env["data_dir"]), workdir)
    return workdir, summary


def launch(env, workdir, *, slow=0.0, overrides=""):
    """Starts `run` in a subprocess; `slow` seconds of sleep per batch (a slow input pipeline)."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        import jax
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        import aia_jax.data as data
        from aia_jax.train import run
        import test_train_run as t
        to_global = data.to_global
        def slow_to_global(batch, mesh):
            time.sleep({slow})
            return to_global(batch, mesh)
        data.to_global = slow_to_global
        c = t.tiny_config({env["data_dir"]!r})
        {overrides}
        print("SUMMARY", run(c, {workdir!r}), flush=True)
    """)
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )


def wait_for_checkpoint(workdir, proc, min_step, timeout=300):
    """Polls until a finished checkpoint of at least `min_step` exists (Orbax renames the
    temporary directory only when it is complete)."""
    directory = os.path.join(workdir, "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()}")
        if os.path.isdir(directory):
            steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
            if steps and max(steps) >= min_step:
                return max(steps)
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


def final_params(workdir, step=12):
    variables, meta = modelio.load_model(workdir, step=step)
    assert meta["step"] == step
    return variables


def assert_same_run(workdir, reference_dir, after_step):
    """Same final parameters and statistics, and the same metrics after `after_step`.

    To float32 rounding, not bit for bit: XLA:CPU's all-reduce over the 8 fake devices may add
    in thread-arrival order, which now and then moves a value by one ulp (seen under load in
    the loss and in a BatchNorm scale); a wrong resume (a batch skipped or repeated, a lost
    optimiser state) moves them by orders of magnitude more.
    """
    a, b = final_params(workdir), final_params(reference_dir)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)
    got, want = read_metrics(workdir), read_metrics(reference_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want]  # no duplicated records
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        if g["step"] > after_step:
            for key in g.keys() - {"clips_per_sec"}:
                np.testing.assert_allclose(g[key], w[key], rtol=1e-5, err_msg=key)


def test_end_to_end_outputs(reference):
    workdir, summary = reference
    assert summary["step"] == 12 and not summary["preempted"]
    assert 0.0 <= summary["val_top1"] <= 1.0 and summary["val_count"] == 24
    for name in ("config.json", "model.json", "metrics.jsonl"):
        assert os.path.isfile(os.path.join(workdir, name))
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    assert config["model"]["name"] == "TSM_CinST_BN" and config["batch_size"] == 16
    meta = modelio.read_meta(workdir)
    assert meta["name"] == "TSM_CinST_BN" and meta["num_classes"] == 12 and meta["depth"] == 14
    records = read_metrics(workdir)
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 13))
    val = [r for r in records if "val/top1" in r]
    assert [r["step"] for r in val] == [4, 8, 12] and all(r["val/count"] == 24 for r in val)
    ckpts = Checkpoints(workdir, read_only=True)
    try:
        steps = ckpts.all_steps()
        best = ckpts.best_step()
    finally:
        ckpts.close()
    best_val = max(val, key=lambda r: r["val/top1"])
    assert 12 in steps and 10 in steps and best in steps  # newest two plus the best
    assert [r["val/top1"] for r in val if r["step"] == best][0] == best_val["val/top1"]
    assert summary["best_step"] == best
    # A model directory written from the workdir loads back the same variables.
    variables, meta = modelio.load_model(workdir, step=12)
    out = os.path.join(os.path.dirname(workdir), "exported")
    modelio.save_model(out, variables, modelio.read_meta(workdir))
    again, meta2 = modelio.load_model(out)
    jax.tree.map(np.testing.assert_array_equal, variables, again)
    assert meta2["name"] == "TSM_CinST_BN"


def test_resume_after_completion_and_stale_temporary(env, reference, tmp_path):
    """A finished workdir resumes as a no-op; a half-written save (Orbax's temporary directory,
    as a crash mid-save leaves it) is ignored and removed."""
    import shutil

    workdir = str(tmp_path / "w")
    shutil.copytree(reference[0], workdir)
    stale = os.path.join(workdir, "checkpoints", "14.orbax-checkpoint-tmp-123", "state")
    os.makedirs(stale)
    with open(os.path.join(stale, "garbage"), "w") as f:
        f.write("half written")
    summary = train.run(tiny_config(env["data_dir"]), workdir)
    assert summary["step"] == 12
    assert not os.path.exists(os.path.dirname(stale))
    assert_same_run(workdir, reference[0], after_step=12)


def test_resume_with_another_network_is_refused_in_one_line(env, reference, tmp_path):
    import shutil

    from aia_jax.errors import UserError

    workdir = str(tmp_path / "w")
    shutil.copytree(reference[0], workdir)
    c = tiny_config(env["data_dir"])
    c.model.width = 16
    with pytest.raises(UserError, match=r"model.json: the workdir's .* \(width 8 → 16\); use a"):
        train.run(c, workdir)


def test_resume_with_another_batch_size_is_refused_in_one_line(env, reference, tmp_path):
    """The steps, the epochs they mean and the learning-rate schedule follow the batch size."""
    import shutil

    workdir = str(tmp_path / "w")
    shutil.copytree(reference[0], workdir)
    c = tiny_config(env["data_dir"])
    c.batch_size = 8
    with pytest.raises(UserError) as e:
        train.run(c, workdir)
    assert str(e.value) == (
        f"{workdir}/config.json: the run in this workdir has batch_size 16, this config 8 (its "
        "epochs and learning-rate schedule would no longer match); resume with "
        "--config.batch_size=16, or use a new workdir"
    )


def test_failures_before_anything_is_written(env, tmp_path):
    """Checked up front, before any compilation and before the workdir is created: a workdir
    that is a file, a val list that cannot be read, a bad init_from, a network T that is not
    the clips' length."""
    from aia_jax.data import testing

    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(UserError, match=r"workdir .*/file: exists and is not a directory"):
        train.run(tiny_config(env["data_dir"]), str(a_file))

    workdir = tmp_path / "w"
    c = tiny_config(env["data_dir"])
    c.init_from = str(tmp_path / "missing")
    with pytest.raises(UserError, match="init_from=.*missing'?: no such model directory"):
        train.run(c, str(workdir))
    assert not workdir.exists()

    c = tiny_config(env["data_dir"])
    c.data.sampling, c.data.clip_len = "dense3d", 8
    with pytest.raises(UserError, match=r"model.num_segments=4 but data.clip_len=8 \(data.sa"):
        train.run(c, str(workdir))

    root = tmp_path / "frames"
    testing.write_frame_folders(str(root), 16, 4, size=(32, 32))
    c = tiny_config(env["data_dir"])
    c.data.source, c.data.root, c.data.media_dir = "frames", str(root), "frames"
    c.data.train_list, c.data.val_list = "train.txt", "val.txt"
    c.data.filename_template, c.data.num_classes = "img_{:05d}.jpg", 4
    with pytest.raises(UserError, match="val.txt"):
        train.run(c, str(workdir))
    assert not workdir.exists()


def test_resume_with_another_optimiser_is_refused_in_one_line(env, reference, tmp_path):
    import shutil

    workdir = str(tmp_path / "w")
    shutil.copytree(reference[0], workdir)
    c = tiny_config(env["data_dir"])
    c.optimizer.clip_grad_norm = 0.0  # one part fewer in the optimiser's chain
    with pytest.raises(UserError, match=r"checkpoints/12: .*the optimiser differs .* leaves sav"):
        train.run(c, workdir)


def test_resume_from_a_damaged_checkpoint_names_it_and_the_previous_one(env, reference, tmp_path):
    import shutil

    workdir = str(tmp_path / "w")
    shutil.copytree(reference[0], workdir)
    data = os.path.join(workdir, "checkpoints", "12", "state", "d")
    for name in os.listdir(data):  # the array data, as a disk error would leave it
        os.truncate(os.path.join(data, name), 10)
    with pytest.raises(UserError) as e:
        train.run(tiny_config(env["data_dir"]), workdir)
    message = str(e.value)
    assert "checkpoints/12: cannot resume, this checkpoint is damaged or incomplete" in message
    assert message.endswith("to resume from step 10") and "\n" not in message


def test_sigkill_then_resume_matches_uninterrupted(env, reference, tmp_path):
    workdir = str(tmp_path / "w")
    proc = launch(env, workdir, slow=0.4)
    killed_after = wait_for_checkpoint(workdir, proc, min_step=6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed_after < 12
    summary = train.run(tiny_config(env["data_dir"]), workdir)
    assert summary["step"] == 12
    assert_same_run(workdir, reference[0], after_step=killed_after)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_saves_and_exits_then_resume_matches(env, reference, tmp_path, stop):
    """SIGTERM (a preemption) and a first Ctrl-C (SIGINT) both save the step and exit."""
    workdir = str(tmp_path / "w")
    proc = launch(env, workdir, slow=0.4)
    wait_for_checkpoint(workdir, proc, min_step=2)
    time.sleep(0.5)  # stop between two periodic checkpoints
    proc.send_signal(stop)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "'preempted': True" in out, out
    assert re.search(r"Training step (compiled|read from the cache) in \d+\.\d s\.", out), out
    ckpts = Checkpoints(workdir, read_only=True)
    saved = ckpts.latest_step()
    ckpts.close()
    assert 2 <= saved < 12
    summary = train.run(tiny_config(env["data_dir"]), workdir)
    assert summary["step"] == 12
    assert_same_run(workdir, reference[0], after_step=saved)


def test_train_py_compiles_then_restarts_to_run_from_the_cache(env, reference, tmp_path):
    """On the CPU with the one arena, `train.py` compiles its programs into an empty cache,
    replaces its process, and the new one reads every program back, compiles none of the
    steps again (the steps' arguments match the ones compiled for) and trains as `run` does."""
    config = tmp_path / "tiny.py"
    config.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        from test_train_run import tiny_config
        def get_config():
            return tiny_config({env["data_dir"]!r})
        """)
    )
    cache, workdir = tmp_path / "cache", tmp_path / "w"
    child_env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        # Every program written, however fast the machine compiles it.
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "AIA_JAX_RETAIN_HOST_MEMORY": "1",
    }
    child_env.pop("AIA_JAX_RESTARTED", None)
    child_env.pop("AIA_JAX_RESTART_AFTER_COMPILE", None)
    out = subprocess.run(
        [sys.executable, "train.py", "--config", str(config), "--workdir", str(workdir)],
        cwd=ROOT,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    first, restarted = out.stdout.split("Restarting to run them from the cache", 1)
    assert "Training step compiled in" in first and "Evaluation step compiled in" in first
    for name in ("Training step", "Evaluation step"):
        assert f"{name} read from the cache in" in restarted, out.stdout
    assert "Restarting" not in restarted and "Finished at step 12" in restarted
    # Written by the first process (the initial state by its call): a step or initial state
    # compiled again after the restart, under another key, would add an entry.
    entries = [name.split("-")[0] for name in os.listdir(cache) if name.endswith("-cache")]
    assert sorted(e for e in entries if e in ("jit_init_state", "jit_step")) == [
        "jit_init_state",
        "jit_step",
        "jit_step",
    ], entries
    assert_same_run(str(workdir), reference[0], after_step=0)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(env, reference, tmp_path):
    """Resumed from the reference run's step 10 (its newest checkpoint once 12 is gone), with
    a learning rate that makes every parameter NaN at the next update."""
    import shutil

    workdir = str(tmp_path / "w")
    shutil.copytree(reference[0], workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
    ckpts = Checkpoints(workdir, read_only=True)
    kept = ckpts.all_steps()
    ckpts.close()
    assert max(kept) == 10
    c = tiny_config(env["data_dir"])
    c.optimizer.lr = float("nan")
    with pytest.raises(
        train.NonFiniteLossError,
        match=r"at step 11.*last good checkpoint is "
        r"step 10",
    ):
        train.run(c, workdir)
    ckpts = Checkpoints(workdir, read_only=True)
    assert ckpts.all_steps() == kept  # nothing saved after the NaN, nothing removed
    ckpts.close()
    variables, _ = modelio.load_model(workdir, step=10)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def test_init_from(env, reference, tmp_path):
    """From a model directory (every tensor copied), and from a release `.pth` with another
    number of classes (converted on the fly; the trainer keeps its own classifier)."""
    import jax.numpy as jnp

    from aia_jax import convert, models

    variables, meta = modelio.load_model(reference[0], step=12)
    model_dir = str(tmp_path / "model")
    modelio.save_model(model_dir, variables, meta)

    other = models.create("TSM_CinST_BN", num_classes=7, num_segments=4, depth=14, width=8)
    dummy = jnp.zeros((1, 4, 32, 32, 3))
    v7 = jax.jit(lambda k: other.init(k, dummy, train=False))(jax.random.PRNGKey(3))
    pth = str(tmp_path / "release.safetensors")
    convert.save_torch(convert.to_torch(v7, other), pth)
    loaded = modelio.load_for_init(pth, meta)
    assert loaded["params"]["new_fc"]["kernel"].shape[-1] == 7
    merged, copied, kept = modelio.merge_for_init(variables, loaded)
    assert sorted(kept) == ["params/new_fc/bias", "params/new_fc/kernel"]
    np.testing.assert_array_equal(
        merged["params"]["base_model"]["conv1"]["kernel"],
        loaded["params"]["base_model"]["conv1"]["kernel"],
    )
    with pytest.raises(FileNotFoundError, match="init_from"):
        modelio.load_for_init(str(tmp_path / "missing"), meta)
    # Another depth or width would share only some tensors: refused, not half copied.
    with pytest.raises(UserError, match=r"another depth 14 \(this model: 50\)"):
        modelio.load_for_init(model_dir, {**meta, "depth": 50})
    wider = jax.tree.map(lambda a: np.zeros((*a.shape[:-1], 2 * a.shape[-1]), a.dtype), variables)
    with pytest.raises(ValueError, match="outside the classifier have another shape"):
        modelio.merge_for_init(variables, wider)
    # A model directory is not a workdir: training into it would rewrite its model.json.
    with pytest.raises(UserError, match="a model directory"):
        train.run(tiny_config(env["data_dir"]), model_dir)

    c = tiny_config(env["data_dir"])
    c.init_from = model_dir
    c.eval_every_epochs = 0.0
    c.keep_checkpoints = 10  # keeps step 2; the schedule is the reference's, so is the program
    workdir = str(tmp_path / "w")
    train.run(c, workdir)
    after, _ = modelio.load_model(workdir, step=2)
    # Two small SGD steps away from the copied parameters (a fresh start is O(1) away).
    worst = max(
        np.abs(a - b).max() / max(1.0, np.abs(b).max())
        for a, b in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(variables["params"]))
    )
    print(f"largest relative change after two steps: {worst:.2e}")
    assert worst <= 1e-2


def test_progress_bar_shows_the_figures_of_the_interval_it_reports(capsys):
    progress = Progress(total_steps=10, initial_step=0, clips_per_step=4)
    for step, loss in ((4, 2.5), (8, 1.25)):
        time.sleep(0.15)  # past tqdm's minimum interval between redraws
        progress.update(step, loss=loss)
        drawn = capsys.readouterr().err.split("\r")[-1]
        assert f"{step}/10" in drawn and f"loss={loss:.4g}" in drawn, drawn
    progress.close()


def test_progress_rate_after_restart_clock_leaves_out_the_first_step(monkeypatch):
    from aia_jax.train import metrics

    now = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    progress = Progress(total_steps=10, initial_step=2, clips_per_step=4)
    now[0] += 3.0  # the first step's call: the heap grows, the threads start
    progress.restart_clock()
    now[0] += 2.0  # four steps
    assert progress.update(6) == 4 * 4 / 2.0
    progress.close()


def test_preemption_on_a_validation_step_validates_before_saving(
    env, reference, tmp_path, monkeypatch
):
    """A preemption that lands on a validation step (step 4, the end of epoch 1) saves that
    step validated, with its metric: it competes for "best" like the uninterrupted run's."""
    import importlib

    run_module = importlib.import_module("aia_jax.train.run")
    monkeypatch.setattr(run_module._Preemption, "reached", lambda self, step: step == 4)
    workdir = str(tmp_path / "w")
    summary = train.run(tiny_config(env["data_dir"]), workdir)
    assert summary["preempted"] and summary["step"] == 4
    val = {r["step"]: r["val/top1"] for r in read_metrics(reference[0]) if "val/top1" in r}
    ckpts = Checkpoints(workdir, read_only=True)
    try:
        assert ckpts.metrics(4) == {"val_top1": pytest.approx(val[4], rel=1e-5)}
    finally:
        ckpts.close()
    # A preemption on the last step: the run is finished, not "preempted" (nothing to resume).
    monkeypatch.setattr(run_module._Preemption, "reached", lambda self, step: step == 12)
    summary = train.run(tiny_config(env["data_dir"]), workdir)
    assert summary["step"] == 12 and not summary["preempted"]
    assert summary["best_step"] == reference[1]["best_step"]
    assert_same_run(workdir, reference[0], after_step=3)


def test_flax2torch_of_a_workdir_writes_its_epoch_and_top1(reference, tmp_path):
    """The release wrapper written from a workdir carries its best checkpoint's epochs trained
    and val top-1 in percent (the release's `best_prec1`), not 0."""
    from aia_jax.convert import __main__ as convert_cli
    from aia_jax.convert import read_checkpoint

    workdir, summary = reference
    out = str(tmp_path / "best.pth.tar")
    assert convert_cli.main(["flax2torch", "--checkpoint", workdir, "--output", out]) == 0
    _, info = read_checkpoint(out)
    best = summary["best_step"]
    val = {r["step"]: r["val/top1"] for r in read_metrics(workdir) if "val/top1" in r}
    assert info["epoch"] == best // 4  # 4 steps per epoch
    assert info["best_prec1"] == pytest.approx(100 * val[best])
    assert info["best_prec1"] > 0


def test_a_url_workdir_is_refused_not_made_a_local_folder(tmp_path, monkeypatch):
    """`os.path` turned `gs://bucket/run` into the local folder `./gs:/bucket/run`: the run
    compiled and trained there, not in the bucket, until Orbax failed at its first save."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        train.run(tiny_config(str(tmp_path / "tfds")), "gs://bucket/run")
    assert str(e.value) == (
        "workdir gs://bucket/run: a URL; the trainer writes through the local file system, so "
        "give a local path or the bucket's mount point (e.g. gcsfuse)"
    )
    assert os.listdir(tmp_path) == []


def test_model_remat_reaches_the_network(env, tmp_path, monkeypatch):
    """`--config.model.remat=True` builds the network with remat (stopped before compiling)."""
    import importlib

    run_module = importlib.import_module("aia_jax.train.run")
    built = {}

    class Built(Exception):
        pass

    def create(name, **kwargs):
        built.update(kwargs)
        raise Built

    monkeypatch.setattr(run_module, "_create_model", create)
    c = tiny_config(env["data_dir"])
    for remat in (True, False):
        c.model.remat = remat
        with pytest.raises(Built):
            train.run(c, str(tmp_path / "w"))
        assert built["remat"] is remat
