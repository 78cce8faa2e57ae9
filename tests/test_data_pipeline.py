"""The grain pipeline: determinism, exact resume, Orbax checkpoints, host shards, global arrays."""

import numpy as np
import pytest

import aia_jax.data as data
from aia_jax.data import pipeline, testing
from aia_jax.data.testing import frame_ids, video_ids


@pytest.fixture(scope="module")
def frames_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    testing.write_frame_folders(str(root), 10, 12, size=(16, 20))
    return root


def config(root, **overrides):
    c = data.get_config()
    c.source, c.root, c.media_dir = "frames", str(root), "frames"
    c.train_list = c.val_list = "train.txt"
    c.filename_template = "img_{:05d}.jpg"
    c.num_classes, c.num_segments = 4, 4
    c.resize, c.crop_size, c.num_workers = (16, 20), 12, 0
    for k, v in overrides.items():
        c[k] = v
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def train(c, seed=0, batch=4, index=0, count=1):
    return data.make_train_iterator(
        c, global_batch_size=batch, seed=seed, process_index=index, process_count=count
    )


def test_same_seed_same_batches(frames_root):
    c = config(frames_root)
    assert_same(take(train(c), 6), take(train(c), 6))
    a, b = take(train(c, seed=0), 3), take(train(c, seed=1), 3)
    assert any(not np.array_equal(x["video"], y["video"]) for x, y in zip(a, b))


def test_resume_continues_exactly(frames_root):
    c = config(frames_root)
    it = train(c)
    take(it, 3)
    state = it.get_state()
    expected = take(it, 4)  # crosses into the next epoch (2 steps per epoch)
    fresh = train(c)
    fresh.set_state(state)
    assert_same(take(fresh, 4), expected)


def test_epochs_cover_each_video_once_and_reshuffle(frames_root):
    c = config(frames_root, flip=False)
    it = train(c, batch=4)  # 10 videos: 2 steps per epoch, 2 videos dropped per epoch
    assert data.steps_per_epoch(c, 4) == 2 and data.num_train_examples(c) == 10
    epochs = [np.concatenate([video_ids(b["video"])[:, 0] for b in take(it, 2)]) for _ in range(3)]
    for e in epochs:
        assert len(set(e.tolist())) == 8
    assert len({tuple(e.tolist()) for e in epochs}) == 3


def test_orbax_checkpoint_of_the_iterator(frames_root, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    c = config(frames_root)
    it = train(c)
    take(it, 2)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",))
    manager.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = take(it, 3)
    fresh = train(c)
    manager.restore(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same(take(fresh, 3), expected)
    manager.close()


def test_worker_processes_give_the_same_batches_and_resume(frames_root):
    c = config(frames_root)
    in_process = train(c)
    expected = take(in_process, 3)
    in_process_state = in_process.get_state()
    expected += take(in_process, 2)
    c.num_workers = 2
    it = train(c)
    got = take(it, 3)
    state = it.get_state()
    got += take(it, 2)
    it.close()
    assert_same(got, expected)
    # The state does not depend on the worker count (grain's own state is per worker: a run
    # resumed with another num_workers could not restore it).
    assert state == in_process_state
    fresh = train(c)
    fresh.set_state(state)
    assert_same(take(fresh, 2), expected[3:])
    fresh.close()
    c.num_workers = 0
    again = train(c)
    again.set_state(state)
    assert_same(take(again, 2), expected[3:])


def test_resume_from_the_grain_state_of_earlier_versions(frames_root):
    c = config(frames_root)
    reference = take(train(c, batch=3), 4)
    one_reader = {"next_index": 6}
    two_workers = {
        "next_index_in_cycle": 0,
        "next_index_in_datasets": 2,
        "iterators_in_use_indices": [0, 1],
        "iterators_in_use_states": [{"next_index": 3}, {"next_index": 3}],
        "exhausted": [0, 0],
        "future_states": {},
    }
    for state in (one_reader, two_workers):
        it = train(c, batch=3)
        it.set_state(state)
        assert_same(take(it, 2), reference[2:])
    with pytest.raises(data.DataError, match="unknown train iterator state"):
        train(c).set_state({"position": 3})


@pytest.mark.parametrize("count", [2, 4])
def test_train_shards_are_disjoint_and_cover_each_epoch(count):
    n, batch, steps = 37, 8, 4  # 37 // 8 = 4 steps per epoch, 5 videos dropped per epoch
    shards = [pipeline.TrainPositions(n, batch, p, count, seed=0) for p in range(count)]
    per_host = batch // count
    for epoch in range(2):
        seen = []
        for step in range(steps):
            rows = range((epoch * steps + step) * per_host, (epoch * steps + step + 1) * per_host)
            block = [[s[i] for i in rows] for s in shards]
            assert all(e == epoch for host in block for e, _, _ in host)
            positions = sorted(pos for host in block for _, pos, _ in host)
            assert positions == list(range(step * batch, (step + 1) * batch))
            seen += [v for host in block for _, _, v in host]
        assert len(seen) == len(set(seen)) == steps * batch
    # The global batch is the same whatever the number of processes.
    single = pipeline.TrainPositions(n, batch, 0, 1, seed=0)
    for step in range(6):
        joined = [s[step * per_host + r][2] for s in shards for r in range(per_host)]
        assert joined == [single[step * batch + r][2] for r in range(batch)]


@pytest.mark.parametrize("count", [2, 4])
def test_eval_shards_cover_every_video_once_with_padding(count):
    n, batch = 10, 8  # two global batches: 10 videos + 6 padding rows
    shards = [pipeline.EvalPositions(n, batch, p, count) for p in range(count)]
    assert all(len(s) == 2 * batch // count for s in shards)
    rows = [s[i] for s in shards for i in range(len(s))]
    valid = [r for r in rows if r >= 0]
    assert sorted(valid) == list(range(n)) and rows.count(-1) == 2 * batch - n


@pytest.mark.parametrize("count", [2, 4])
def test_eval_iterators_per_process(frames_root, count):
    c = config(frames_root)
    indices, shapes = [], set()
    for p in range(count):
        it = data.make_eval_iterator(c, global_batch_size=8, process_index=p, process_count=count)
        assert len(it) == 2 and it.num_examples == 10
        for b in it:
            shapes.add(b["video"].shape)
            indices += b["index"][b["valid"]].tolist()
            assert np.all(b["index"][~b["valid"]] == -1)
            np.testing.assert_array_equal(
                video_ids(b["video"][b["valid"], 0])[:, 0], b["index"][b["valid"]]
            )
    assert shapes == {(8 // count, 1, 4, 12, 12, 3)}
    assert sorted(indices) == list(range(10))


def test_train_hosts_read_their_own_rows(frames_root):
    c = config(frames_root)
    whole = take(train(c, batch=4), 3)
    halves = [take(train(c, batch=4, index=p, count=2), 3) for p in range(2)]
    for step in range(3):
        joined = np.concatenate([halves[0][step]["video"], halves[1][step]["video"]])
        np.testing.assert_array_equal(joined, whole[step]["video"])


def test_dense3d_clips(frames_root):
    c = config(frames_root, sampling="dense3d", clip_len=3, frame_interval=2, flip=False)
    batch = next(train(c))
    assert batch["video"].shape == (4, 3, 12, 12, 3)
    ids = frame_ids(batch["video"])
    assert np.all(np.diff(ids, axis=1) == 2)
    out = next(
        iter(data.make_eval_iterator(c, global_batch_size=2, process_index=0, process_count=1))
    )
    np.testing.assert_array_equal(frame_ids(out["video"][0, 0]), [3, 5, 7])  # int(7 / 2), +2, +4


def test_to_global_and_normalize():
    import jax
    import jax.numpy as jnp

    mesh = jax.make_mesh((8,), ("data",))
    batch = {
        "video": np.full((16, 2, 4, 4, 3), 255, np.uint8),
        "label": np.arange(16, dtype=np.int32),
    }
    out = data.to_global(batch, mesh)
    assert out["video"].shape == (16, 2, 4, 4, 3) and out["label"].sharding.spec == jax.P("data")
    assert len(out["label"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(out["label"]), np.arange(16))
    x = data.normalize(out["video"], jnp.bfloat16)
    assert x.dtype == jnp.bfloat16
    expected = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(np.asarray(x.astype(jnp.float32))[0, 0, 0, 0], expected, rtol=1e-2)
    np.testing.assert_allclose(
        np.asarray(data.normalize(np.zeros((1, 3), np.uint8)))[0],
        [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225],
        rtol=1e-6,
    )
