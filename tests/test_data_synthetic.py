"""The built-in dataset: one call writes it, it reads back without TensorFlow, and its classes
can only be told apart by the order of the frames."""

import os
import sys
import tempfile
import time

import numpy as np
import pytest

import aia_jax.data as data
from aia_jax.data import sampling, synthetic, testing


def test_prepare_writes_a_tfds_dataset_once(tmp_path):
    start = time.time()
    name = synthetic.prepare(str(tmp_path), num_train=24, num_val=12, seed=3)
    assert time.time() - start < 60
    import tensorflow_datasets as tfds

    train = tfds.data_source(name, split="train", data_dir=str(tmp_path), download=False)
    val = tfds.data_source(name, split="validation", data_dir=str(tmp_path), download=False)
    assert (len(train), len(val)) == (24, 12)
    ex = train[0]
    S = synthetic.SIZE
    assert ex["video"].shape == (24, S, S, 3) and ex["video"].dtype == np.uint8
    assert sorted(int(train[i]["label"]) for i in range(24)) == sorted(list(range(12)) * 2)
    assert "tensorflow" not in sys.modules
    # A second call finds it and writes nothing.
    info = os.path.join(
        tmp_path, synthetic.NAME, synthetic.config_name(24, 12, 3), synthetic.VERSION
    )
    mtime = os.path.getmtime(os.path.join(info, "dataset_info.json"))
    assert synthetic.prepare(str(tmp_path), num_train=24, num_val=12, seed=3) == name
    assert os.path.getmtime(os.path.join(info, "dataset_info.json")) == mtime


def test_prepare_leaves_no_temporary_directory(tmp_path, monkeypatch):
    # TFDS's own DatasetInfo makes an empty temporary directory per unprepared builder.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    synthetic.prepare(str(tmp_path / "data"), num_train=2, num_val=1, seed=5)
    testing.write_tfds(str(tmp_path / "data"), "tiny_videos", {"train": 2}, num_frames=2)
    assert os.listdir(scratch) == []


def test_examples_are_deterministic_per_seed():
    a, la = synthetic.example(5, "train", seed=0)
    b, lb = synthetic.example(5, "train", seed=0)
    c, _ = synthetic.example(5, "train", seed=1)
    d, _ = synthetic.example(5, "validation", seed=0)
    assert la == lb == 5 and np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


@pytest.mark.parametrize("pair", range(synthetic.NUM_CLASSES // 2))
def test_each_class_is_the_time_reversal_of_its_pair(pair):
    for seed in range(3):
        params = synthetic.sample_params(pair, np.random.default_rng(seed))
        forward = synthetic.render(2 * pair, params)
        backward = synthetic.render(2 * pair + 1, params)
        # The paired class's clip is exactly the forward clip played backwards …
        np.testing.assert_array_equal(backward, forward[::-1])
        # … so as a multiset of frames the two clips are identical: order is the only cue.
        key = sorted(f.tobytes() for f in forward)
        assert key == sorted(f.tobytes() for f in backward)
        # And the frames do change over time (the motion is there to be seen).
        assert np.abs(forward[0].astype(int) - forward[-1].astype(int)).max() > 50


def test_sampled_frames_carry_no_order_either():
    """With 24 = 3 x 8 frames, the 8-segment train and validation indices are mirror-symmetric,
    so the frames an order-blind network sees of a reversed clip come from the same distribution."""
    n, t = synthetic.NUM_FRAMES, 8
    centres = sampling.tsn_centre(n, t)
    np.testing.assert_array_equal(np.sort(n - 1 - centres), centres)
    rng = np.random.default_rng(0)
    counts = np.zeros(n)
    for _ in range(3000):
        counts[sampling.tsn_train(n, t, rng)] += 1
    np.testing.assert_allclose(counts / counts.sum(), counts[::-1] / counts.sum(), atol=0.01)
    assert np.all(counts > 0)


def test_flip_map_swaps_only_mirror_classes():
    names = synthetic.CLASS_NAMES
    for a, b in synthetic.FLIP_PAIRS:
        assert {names[a], names[b]} in (
            {"moving left to right", "moving right to left"},
            {"turning clockwise", "turning counter-clockwise"},
        )
    c = data.get_config()
    assert data.resolve(c).flip_map == [[0, 1], [8, 9]]
    assert data.num_classes(c) == 12 and data.class_names(c)[9] == "turning counter-clockwise"


def test_default_source_trains_and_evaluates(tmp_path):
    c = data.get_config()  # source 'synthetic' is the default
    c.data_dir = str(tmp_path)
    c.synthetic_num_train, c.synthetic_num_val = 24, 12
    c.resize, c.crop_size = synthetic.RECOMMENDED["resize"], synthetic.RECOMMENDED["crop_size"]
    c.num_workers = 0
    it = data.make_train_iterator(c, global_batch_size=8, seed=0, process_index=0, process_count=1)
    batch = next(it)
    crop = c.crop_size
    assert batch["video"].shape == (8, 8, crop, crop, 3) and batch["label"].max() < 12
    evals = list(data.make_eval_iterator(c, global_batch_size=8, process_index=0, process_count=1))
    assert sum(int(b["valid"].sum()) for b in evals) == 12 == data.num_eval_examples(c)
