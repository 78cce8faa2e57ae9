"""The evaluator: batch-size and device-count independence, view and checkpoint averaging, the
flip-aware 10-crop average, metrics on a hand-made case, the report files and the CLI."""

import csv
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from aia_jax import data, evaluate, metrics_report, modelio, models
from aia_jax.errors import UserError
from aia_jax.train import mesh as mesh_lib

T, S, CLASSES = 4, 32, 4
NUM_VIDEOS = 11


def random_variables(model, num_segments, seed):
    """Random variables of the right shapes, drawn in numpy (no compile: `model.init` under jit
    costs seconds per architecture on a CPU). Kernels are scaled by fan-in so activations stay
    of order one; BatchNorm statistics are not the identity, so that they are exercised too."""
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.PRNGKey(0), jnp.zeros((1, num_segments, S, S, 3)), train=False
        )
    )
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            x = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
        elif name in ("scale", "var"):
            x = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            x = rng.normal(0, 0.1, shape)
        return x.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, dict(shapes))


def make_model_dir(path, seed=0, num_segments=T, name="TSM_CinST_BN", class_names=None):
    """A tiny model directory with random weights."""
    model = models.create(
        name, num_classes=CLASSES, num_segments=num_segments, depth=14, width=8, dropout=0.5
    )
    variables = random_variables(model, num_segments, seed)
    meta = modelio.model_meta(
        name, num_classes=CLASSES, num_segments=num_segments, depth=14, width=8, dropout=0.5
    )
    if class_names:
        meta["class_names"] = list(class_names)
    modelio.save_model(str(path), variables, meta)
    return str(path)


def write_dataset(root, num_videos=NUM_VIDEOS, size=(36, 44)):
    """Frame folders of textured JPEGs (so crops differ) and a `dir num_frames label` list."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(num_videos):
        n = 6 + i % 5
        folder = os.path.join(root, "frames", f"vid{i:02d}")
        os.makedirs(folder)
        # Texture (so that crops differ) over a colour of the video's own (so videos differ).
        tint = rng.integers(0, 256, 3)
        noise = rng.integers(0, 256, (size[0] // 4, size[1] // 4, 3))
        base = ((noise + 3 * tint) // 4).astype(np.uint8)
        for f in range(n):
            img = np.kron(np.roll(base, f, axis=1), np.ones((4, 4, 1), np.uint8))
            Image.fromarray(img).save(os.path.join(folder, f"{f + 1:05d}.jpg"), quality=95)
        lines.append(f"vid{i:02d} {n} {(i * 7) % CLASSES}")
    with open(os.path.join(root, "val.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def data_config(root, **overrides):
    c = data.get_config()
    c.source = "frames"
    c.root = str(root)
    c.media_dir = "frames"
    c.train_list = c.val_list = "val.txt"
    c.num_classes = CLASSES
    c.num_segments = T
    c.resize = (36, 44)
    c.crop_size = S
    c.num_workers = 0
    c.flip_map = []
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_dataset(str(root / "data"))
    ck1 = make_model_dir(root / "model1", seed=2)  # seed 2: predictions vary
    ck2 = make_model_dir(root / "model2", seed=3)
    return root, data_config(root / "data"), ck1, ck2


def manual_view_logits(cfg, checkpoint):
    """Per-view logits `[N, V, K]` by applying the model to every view of the pipeline."""
    variables, meta = modelio.load_model(checkpoint)
    model = modelio.create_model(meta)
    n = data.num_eval_examples(cfg, "val")
    batch = next(
        iter(
            data.make_eval_iterator(
                cfg, split="val", global_batch_size=n, process_index=0, process_count=1
            )
        )
    )
    video = batch["video"]
    clips = data.normalize(video.reshape(-1, *video.shape[2:]), jnp.float32)
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, clips)
    return np.asarray(logits).reshape(n, video.shape[1], -1), batch["label"]


def test_batch_size_and_device_count_independent(setup):
    _, cfg, ck1, _ = setup
    reference = evaluate.evaluate(cfg, [ck1], batch_size=8)
    assert reference["metrics"]["num_videos"] == NUM_VIDEOS
    np.testing.assert_array_equal(reference["index"], np.arange(NUM_VIDEOS))
    one_device = mesh_lib.make_mesh(jax.devices()[:1])
    same_mesh = [evaluate.evaluate(cfg, [ck1], batch_size=b) for b in (1, 3)]
    other_mesh = [evaluate.evaluate(cfg, [ck1], batch_size=b, mesh=one_device) for b in (3, 8)]
    for r in same_mesh + other_mesh:
        assert r["metrics"] == reference["metrics"]
        np.testing.assert_array_equal(r["index"], reference["index"])
        np.testing.assert_array_equal(r["label"], reference["label"])
        np.testing.assert_array_equal(r["predictions"], reference["predictions"])
        np.testing.assert_allclose(r["scores"], reference["scores"], rtol=1e-5, atol=1e-5)
    for r in same_mesh:  # one row per device whatever the batch size: bit for bit
        np.testing.assert_array_equal(r["scores"], reference["scores"])
    # The predictions are not all one class (else the test would prove little).
    assert len(np.unique(reference["predictions"])) > 1


def test_views_are_averaged(setup):
    _, cfg, ck1, _ = setup
    cfg = data_config(cfg.root, test_clips="twice", test_crops=3)
    expected, labels = manual_view_logits(cfg, ck1)
    assert expected.shape[1] == 6
    assert not np.allclose(expected[:, 0], expected[:, 1])  # the views do differ
    r = evaluate.evaluate(cfg, [ck1], batch_size=4, return_view_logits=True)
    assert r["protocol"]["views"] == 6
    assert "2 clips" in r["protocol"]["description"]
    assert "3 full-resolution crops 36x36" in r["protocol"]["description"]
    np.testing.assert_array_equal(r["label"], labels)
    np.testing.assert_allclose(r["view_logits"][0], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r["scores"], expected.mean(axis=1), rtol=1e-4, atol=1e-4)

    soft = evaluate.evaluate(cfg, [ck1], batch_size=4, average="softmax")
    probs = np.exp(expected) / np.exp(expected).sum(-1, keepdims=True)
    np.testing.assert_allclose(soft["scores"], probs.mean(axis=1), rtol=1e-4, atol=1e-5)


def test_mirrored_views_are_unflipped(setup):
    _, cfg, ck1, _ = setup
    cfg = data_config(cfg.root, test_crops=10, flip_map=[[0, 1]])
    expected, _ = manual_view_logits(cfg, ck1)
    unflipped = expected.copy()
    unflipped[:, 1::2] = expected[:, 1::2][..., [1, 0, 2, 3]]  # odd views are the mirrors
    r = evaluate.evaluate(cfg, [ck1], batch_size=8)
    np.testing.assert_allclose(r["scores"], unflipped.mean(axis=1), rtol=1e-4, atol=1e-4)
    assert "flip map" in r["protocol"]["description"]
    raw = evaluate.evaluate(cfg, [ck1], batch_size=8, unflip_mirrored=False)
    np.testing.assert_allclose(raw["scores"], expected.mean(axis=1), rtol=1e-4, atol=1e-4)


def test_bad_flip_map_is_refused_before_the_pass_over_the_data(setup, monkeypatch):
    _, cfg, ck1, _ = setup
    cfg = data_config(cfg.root, test_crops=10, flip_map=[[0, 9]])  # 4 classes

    def no_pass(*args, **kwargs):
        raise AssertionError("the data was read before the flip map was checked")

    monkeypatch.setattr(evaluate, "_run_group", no_pass)
    with pytest.raises(UserError, match=r"config.data.flip_map: .*0->9 is outside \[0, 4\)"):
        evaluate.evaluate(cfg, [ck1], batch_size=8)


def test_class_names_file_of_another_length_is_refused_before_the_pass(
    setup, tmp_path, monkeypatch
):
    """A `classnames` file the user named, with a line missing or absent, must not turn into
    class numbers in the per-class report after the whole pass over the data."""
    _, cfg, ck1, _ = setup
    good = tmp_path / "good.txt"
    good.write_text("a\nb\nc\nd\n")
    r = evaluate.evaluate(data_config(cfg.root, classnames=str(good)), [ck1])
    assert r["class_names"] == ["a", "b", "c", "d"]

    def no_pass(*args, **kwargs):
        raise AssertionError("the data was read before the class names were checked")

    monkeypatch.setattr(evaluate, "_run_group", no_pass)
    short = tmp_path / "short.txt"
    short.write_text("a\nb\nc\n")
    with pytest.raises(data.DataError, match=r"short.txt: 3 class names for 4 classes"):
        evaluate.evaluate(data_config(cfg.root, classnames=str(short)), [ck1])
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(data.DataError, match=r"classnames .*missing.txt: file not found"):
        evaluate.evaluate(data_config(cfg.root, classnames=missing), [ck1])


def test_ensemble_is_the_mean_of_scores(setup, tmp_path):
    _, cfg, ck1, ck2 = setup
    ck3 = make_model_dir(tmp_path / "t2", seed=4, num_segments=2)  # another clip length
    singles = [
        evaluate.evaluate(cfg, [c], return_view_logits=True)["view_logits"][0]
        for c in (ck1, ck2, ck3)
    ]  # [N, V=1, K] each
    for average in ("logits", "softmax"):
        both = evaluate.evaluate(cfg, [ck1, ck2, ck3], average=average)
        per_ckpt = np.stack([s[:, 0] for s in singles])
        if average == "softmax":
            per_ckpt = np.exp(per_ckpt) / np.exp(per_ckpt).sum(-1, keepdims=True)
        np.testing.assert_allclose(both["checkpoint_scores"], per_ckpt, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(both["scores"], per_ckpt.mean(axis=0), rtol=1e-5, atol=1e-6)
        assert both["protocol"]["num_checkpoints"] == 3
        assert "3 checkpoints" in both["protocol"]["description"]


def test_every_video_unreadable_is_one_error(setup, tmp_path):
    """With `on_bad_sample='skip'` every unreadable video becomes padding; when that is all of
    them there is nothing to count: one error naming the list, not the metrics' ValueError."""
    import shutil

    root, cfg, ck1, _ = setup
    bad = tmp_path / "bad"
    shutil.copytree(cfg.root, bad)
    for folder, _, names in os.walk(bad / "frames"):
        for name in names:
            with open(os.path.join(folder, name), "wb") as f:
                f.write(b"not a jpeg")
    bad_cfg = data_config(bad, on_bad_sample="skip")
    with pytest.raises(data.DataError, match=r"val split: none of the 11 videos could be read "):
        evaluate.evaluate(bad_cfg, [ck1], batch_size=4)


def test_metrics_hand_made():
    scores = np.array(
        [
            [0.9, 0.1, 0.0],  # label 0, predicted 0
            [0.2, 0.7, 0.1],  # label 0, predicted 1
            [0.1, 0.8, 0.1],  # label 1, predicted 1
            [0.3, 0.3, 0.4],  # label 1, predicted 2 (top-2: 2, then 0 by index)
        ]
    )
    labels = np.array([0, 0, 1, 1])
    m = metrics_report.classification_metrics(scores, labels, 3)
    assert m["top1"] == 0.5
    assert m["top5"] == 1.0  # capped at 3 classes
    np.testing.assert_array_equal(
        metrics_report.top_k_correct(scores, labels, 2), [True, True, True, False]
    )
    np.testing.assert_array_equal(m["confusion"], [[1, 1, 0], [0, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(m["class_count"], [2, 2, 0])
    np.testing.assert_allclose(m["class_accuracy"][:2], [0.5, 0.5])
    assert np.isnan(m["class_accuracy"][2])
    assert m["mean_class_accuracy"] == 0.5  # the class without videos is not counted
    unbalanced = metrics_report.classification_metrics(scores[1:], labels[1:], 3)
    assert unbalanced["top1"] == pytest.approx(1 / 3)
    assert unbalanced["mean_class_accuracy"] == pytest.approx(0.25)  # (0 + 0.5) / 2


def test_protocol_names_the_list_it_reads(setup):
    """`--split test` without a test list reads the val list: the protocol says which file."""
    root, cfg, _, _ = setup
    val_list = os.path.join(str(root / "data"), "val.txt")
    val = evaluate.describe_protocol(cfg, split="val")
    assert val["examples"] == val_list
    assert val["description"].endswith(f"; videos: {val_list}")
    test = evaluate.describe_protocol(cfg, split="test")
    assert test["examples"] == f"{val_list} (config.data.test_list is empty: the val list)"
    cfg_test = data_config(root / "data", test_list="test.txt")
    named = evaluate.describe_protocol(cfg_test, split="test")["examples"]
    assert named == os.path.join(str(root / "data"), "test.txt")
    synthetic = evaluate.describe_protocol(data.get_config(), split="val")["examples"]
    assert synthetic == "the synthetic dataset's 'validation' split"


def test_report_files(setup, tmp_path):
    _, cfg, ck1, _ = setup
    out = tmp_path / "report"
    r = evaluate.evaluate(cfg, [ck1], workdir=str(out))
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["metrics"]["top1"] == r["metrics"]["top1"]
    assert results["protocol"]["test_clips"] == "single"
    assert results["protocol"]["dtype"] == "float32"
    assert results["protocol"]["description"].startswith("val split: 1 clip of 4 frames")
    assert results["checkpoints"][0]["path"] == os.path.abspath(ck1)
    with open(out / "per_class_accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["name"] for row in rows] == ["0", "1", "2", "3"]
    assert sum(int(row["videos"]) for row in rows) == NUM_VIDEOS
    with open(out / "confusion_matrix.csv") as f:
        cm = np.array([row[1:] for row in list(csv.reader(f))[1:]], int)
    np.testing.assert_array_equal(cm, r["confusion"])
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    npz = np.load(out / "scores.npz")
    np.testing.assert_array_equal(npz["index"], np.arange(NUM_VIDEOS))
    np.testing.assert_array_equal(npz["label"], r["label"])
    np.testing.assert_allclose(npz["scores"], r["scores"])


def test_results_name_the_compute_dtype(setup, tmp_path):
    """A bfloat16 training config evaluates in bfloat16 by default: the results file says so."""
    _, cfg, ck1, _ = setup
    out = tmp_path / "report"
    config = ml_collections.ConfigDict({"data": cfg.to_dict(), "dtype": "bfloat16"})
    r = evaluate.evaluate(config, [ck1], workdir=str(out))
    with open(out / "results.json") as f:
        protocol = json.load(f)["protocol"]
    assert protocol["dtype"] == r["protocol"]["dtype"] == "bfloat16"
    assert "; computed in bfloat16; videos: " in protocol["description"]


def test_workdir_that_cannot_hold_the_report_is_refused_before_the_pass(
    setup, tmp_path, monkeypatch
):
    """Else the whole pass over the data ends in a FileExistsError traceback."""
    _, cfg, ck1, _ = setup

    def no_pass(*args, **kwargs):
        raise AssertionError("the data was read before the workdir was checked")

    monkeypatch.setattr(evaluate, "_run_group", no_pass)
    a_file = tmp_path / "results"
    a_file.write_text("")
    with pytest.raises(UserError, match=r"workdir .*results: exists and is not a directory"):
        evaluate.evaluate(cfg, [ck1], workdir=str(a_file))
    under_a_file = str(a_file / "report")
    with pytest.raises(UserError, match=r"workdir .*results/report: cannot create it"):
        evaluate.evaluate(cfg, [ck1], workdir=under_a_file)


def test_report_without_matplotlib_writes_the_rest(setup, tmp_path, monkeypatch, caplog):
    """Installed without the `plot` extra: no PNG, a warning naming it, every other file."""
    _, cfg, ck1, _ = setup
    out = tmp_path / "report"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    with caplog.at_level("WARNING"):
        r = evaluate.evaluate(cfg, [ck1], workdir=str(out))
    assert "confusion_matrix.png not written: matplotlib is not installed" in caplog.text
    assert sorted(os.listdir(out)) == [
        "confusion_matrix.csv",
        "per_class_accuracy.csv",
        "results.json",
        "scores.npz",
    ]
    with open(out / "results.json") as f:
        assert "confusion_png" not in json.load(f)["files"]
    np.testing.assert_allclose(np.load(out / "scores.npz")["scores"], r["scores"])


def test_cli(setup, tmp_path, capsys):
    root, cfg, ck1, ck2 = setup
    config_file = tmp_path / "eval_config.py"
    config_file.write_text(
        "import ml_collections\n"
        "from aia_jax import data\n\n\n"
        "def get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.data = data.get_config()\n"
        "    c.data.source = 'frames'\n"
        "    c.data.media_dir = 'frames'\n"
        "    c.data.val_list = 'val.txt'\n"
        f"    c.data.num_classes = {CLASSES}\n"
        f"    c.data.num_segments = {T}\n"
        "    c.data.resize = (36, 44)\n"
        f"    c.data.crop_size = {S}\n"
        "    c.data.num_workers = 0\n"
        "    c.eval_batch_size = 2\n"
        "    return c\n"
    )
    out = tmp_path / "cli"
    evaluate.main(
        [
            "evaluate",
            "--config",
            str(config_file),
            f"--config.data.root={cfg.root}",
            "--checkpoint",
            ck1,
            ck2,
            "--workdir",
            str(out),
            "--test-crops",
            "3",
            "--average",
            "softmax",
            "--batch-size",
            "3",
        ]
    )
    printed = capsys.readouterr().out
    assert "Protocol: val split: 1 clip of 4 frames" in printed
    assert "3 full-resolution crops" in printed and "2 checkpoints" in printed
    assert "top-1" in printed and "top-5" in printed and "mean class accuracy" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["average"] == "softmax"
    assert len(results["checkpoints"]) == 2
    expected = evaluate.evaluate(
        ml_collections.ConfigDict({"data": data_config(cfg.root, test_crops=3)}),
        [ck1, ck2],
        average="softmax",
        batch_size=3,
    )
    assert results["metrics"]["top1"] == expected["metrics"]["top1"]


def _make_workdir(setup, workdir):
    """A training workdir with `ck1` at step 1 (the best) and `ck2` at step 2."""
    from aia_jax.train.checkpoint import Checkpoints
    from aia_jax.train.step import TrainState

    _, cfg, ck1, ck2 = setup
    ckpts = Checkpoints(str(workdir), async_save=False)
    for step, (ck, top1) in enumerate([(ck1, 0.9), (ck2, 0.1)], start=1):  # the best is step 1
        variables, meta = modelio.load_model(ck)
        state = TrainState(
            step=np.int32(step),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state={},
            rng=np.zeros(2, np.uint32),
        )
        ckpts.save(step, state, None, metrics={"val_top1": top1})
    ckpts.close()
    modelio.write_meta(str(workdir), meta)
    (workdir / "config.json").write_text(json.dumps({"data": cfg.to_dict()}))


def test_training_workdir_uses_its_best_checkpoint(setup, tmp_path, capsys, monkeypatch):
    _, cfg, ck1, _ = setup
    workdir = tmp_path / "run"
    _make_workdir(setup, workdir)
    # Written by process 1 of a two-host job: its group is gone once that job ended.
    recorded = json.loads((workdir / "config.json").read_text())
    recorded["distributed"] = {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 2,
        "process_id": 1,
    }
    (workdir / "config.json").write_text(json.dumps(recorded))

    r = evaluate.evaluate(cfg, [str(workdir)])
    assert r["checkpoints"][0]["step"] == 1
    np.testing.assert_allclose(r["scores"], evaluate.evaluate(cfg, [ck1])["scores"])
    # Without --config the CLI reads the workdir's config.json, but not its process group
    # (joining it again would wait for the training job's processes until a timeout).
    joined = []
    monkeypatch.setattr(evaluate.mesh_lib, "initialize_distributed", joined.append)
    evaluate.main(["evaluate", "--checkpoint", str(workdir)])
    assert f"top-1 {100 * r['metrics']['top1']:.2f}%" in capsys.readouterr().out
    assert joined == [None]


def test_step_that_does_not_exist_or_of_a_model_directory(setup, tmp_path):
    """Orbax reports a missing step as a damaged checkpoint; a model directory has no steps."""
    workdir = tmp_path / "run"
    _make_workdir(setup, workdir)
    assert modelio.load_model(str(workdir), step=2)[1]["step"] == 2
    with pytest.raises(
        modelio.InputNotFoundError,
        match=r"step 7: no such checkpoint in .*run/checkpoints \(available steps: 1, 2\)",
    ):
        modelio.load_model(str(workdir), step=7)
    with pytest.raises(UserError, match=r"step 1: .* is a model directory .* leave out the step"):
        modelio.load_model(setup[2], step=1)


def test_damaged_checkpoint_is_one_error(tmp_path, capfd):
    """A model directory with a truncated data file or without its metadata is named in one
    error, without the 'Event loop is closed' reports of the reads still in flight."""
    import shutil
    import time

    good = make_model_dir(tmp_path / "good")
    modelio.load_model(good)
    truncated = str(tmp_path / "truncated")
    shutil.copytree(good, truncated)
    data_files = [
        os.path.join(folder, name)
        for folder, _, names in os.walk(os.path.join(truncated, modelio.VARIABLES_DIR))
        for name in names
        if os.sep + "d" + os.sep in os.path.join(folder, name) + os.sep
    ]
    for path in data_files:
        os.truncate(path, 100)
    no_metadata = str(tmp_path / "no_metadata")
    shutil.copytree(good, no_metadata)
    os.remove(os.path.join(no_metadata, modelio.VARIABLES_DIR, "_METADATA"))
    capfd.readouterr()
    for path in (truncated, no_metadata):
        with pytest.raises(modelio.UserError, match="incomplete or damaged"):
            modelio.load_model(path)
    time.sleep(0.5)  # the other reads' callbacks arrive after the error
    assert "Event loop is closed" not in capfd.readouterr().err
