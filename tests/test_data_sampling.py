"""Frame indices of every sampling rule against hand-computed cases."""

import numpy as np
import pytest

from aia_jax.data import sampling


class FixedRng:
    """Stands in for np.random.Generator: `integers` returns the given values in turn."""

    def __init__(self, *values):
        self.values = list(values)

    def integers(self, high, size=None):
        out = np.asarray(self.values.pop(0))
        assert np.all(out < high), (out, high)
        assert size is None or out.shape == (size,)
        return out


def test_tsn_train_one_random_frame_per_segment():
    # 20 frames, 4 segments of 5: segment starts 0, 5, 10, 15 plus the draws.
    got = sampling.tsn_train(20, 4, FixedRng([4, 0, 2, 1]))
    np.testing.assert_array_equal(got, [4, 5, 12, 16])
    # 22 frames: still segments of 5 (22 // 4), frames 20 and 21 are never used.
    got = sampling.tsn_train(22, 4, FixedRng([4, 4, 4, 4]))
    np.testing.assert_array_equal(got, [4, 9, 14, 19])


def test_tsn_train_real_rng_stays_in_segments():
    rng = np.random.default_rng(0)
    for _ in range(50):
        got = sampling.tsn_train(37, 8, rng)  # segments of 4
        assert np.all(got // 4 == np.arange(8))


def test_tsn_train_short_videos():
    np.testing.assert_array_equal(sampling.tsn_train(8, 8, FixedRng([0] * 8)), np.arange(8))
    np.testing.assert_array_equal(sampling.tsn_train(5, 8, FixedRng()), np.zeros(8))
    np.testing.assert_array_equal(sampling.tsn_train(1, 8, FixedRng()), np.zeros(8))


def test_tsn_centre():
    np.testing.assert_array_equal(sampling.tsn_centre(20, 4), [2, 7, 12, 17])
    # tick 2.5: int(1.25), int(3.75), int(6.25), int(8.75)
    np.testing.assert_array_equal(sampling.tsn_centre(10, 4), [1, 3, 6, 8])
    # T or fewer frames: the release's validation takes frame 0 throughout.
    np.testing.assert_array_equal(sampling.tsn_centre(8, 8), np.zeros(8))
    np.testing.assert_array_equal(sampling.tsn_centre(5, 8), np.zeros(8))


def test_tsn_twice():
    np.testing.assert_array_equal(sampling.tsn_twice(10, 4), [[1, 3, 6, 8], [0, 2, 5, 7]])
    # A short video repeats frames instead of falling back to zeros.
    np.testing.assert_array_equal(
        sampling.tsn_twice(4, 8), [[0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 1, 1, 2, 2, 3, 3]]
    )


def test_tsn_dense():
    got = sampling.tsn_dense(100, 8)  # stride 64 // 8 = 8, starts linspace(0, 36, 10)
    assert got.shape == (10, 8)
    np.testing.assert_array_equal(got[:, 0], [0, 4, 8, 12, 16, 20, 24, 28, 32, 36])
    np.testing.assert_array_equal(got[0], [0, 8, 16, 24, 32, 40, 48, 56])
    np.testing.assert_array_equal(got[9], [36, 44, 52, 60, 68, 76, 84, 92])
    # Shorter than the 64-frame window: every clip starts at 0 and wraps around.
    got = sampling.tsn_dense(30, 8)
    np.testing.assert_array_equal(got, np.tile([0, 8, 16, 24, 2, 10, 18, 26], (10, 1)))
    # 16 segments: stride 4.
    np.testing.assert_array_equal(sampling.tsn_dense(64, 16)[0], np.arange(16) * 4)


def test_dense3d_train():
    # span 4 * 2 = 8; (100 - 8 + 1) // 1 = 93 possible starts; draw 7.
    np.testing.assert_array_equal(
        sampling.dense3d_train(100, 4, 2, 1, FixedRng([7])), [[7, 9, 11, 13]]
    )
    # Two clips: avg interval (100 - 8 + 1) // 2 = 46; starts 0 + 5, 46 + 45.
    got = sampling.dense3d_train(100, 4, 2, 2, FixedRng([5, 45]))
    np.testing.assert_array_equal(got, [[5, 7, 9, 11], [91, 93, 95, 97]])
    # Exactly the span: one start.
    np.testing.assert_array_equal(sampling.dense3d_train(8, 4, 2, 1, FixedRng([0])), [[0, 2, 4, 6]])


def test_dense3d_train_short_videos():
    # Shorter than the span: start 0, frames loop: 6 % 5 = 1.
    np.testing.assert_array_equal(sampling.dense3d_train(5, 4, 2, 1, FixedRng()), [[0, 2, 4, 1]])
    # avg interval 0 (8 frames, span 8, 2 clips): starts round([0, 0.5]) = [0, 0].
    got = sampling.dense3d_train(8, 4, 2, 2, FixedRng())
    np.testing.assert_array_equal(got, [[0, 2, 4, 6], [0, 2, 4, 6]])


def test_dense3d_test():
    got = sampling.dense3d_test(100, 4, 2, 10)  # avg 9.3, starts int(9.3 k + 4.65)
    np.testing.assert_array_equal(got[:, 0], [4, 13, 23, 32, 41, 51, 60, 69, 79, 88])
    np.testing.assert_array_equal(got[0], [4, 6, 8, 10])
    np.testing.assert_array_equal(sampling.dense3d_test(100, 4, 2, 1), [[46, 48, 50, 52]])
    np.testing.assert_array_equal(sampling.dense3d_test(5, 4, 2, 1), [[0, 2, 4, 1]])


def test_dispatch_by_config_names():
    rng = np.random.default_rng(0)
    kw = dict(num_segments=8, clip_len=4, frame_interval=2)
    assert sampling.train_indices(100, sampling="tsn", rng=rng, **kw).shape == (8,)
    assert sampling.train_indices(100, sampling="dense3d", rng=rng, **kw).shape == (4,)
    for clips, n in (("single", 1), ("twice", 2), ("dense", 10)):
        assert sampling.eval_indices(100, sampling="tsn", test_clips=clips, **kw).shape == (n, 8)
        assert sampling.eval_indices(100, sampling="dense3d", test_clips=clips, **kw).shape == (
            n,
            4,
        )
    np.testing.assert_array_equal(
        sampling.eval_indices(20, sampling="tsn", test_clips="single", **{**kw, "num_segments": 4}),
        [[2, 7, 12, 17]],
    )
    with pytest.raises(ValueError, match="sampling"):
        sampling.train_indices(10, sampling="x", rng=rng, **kw)
    with pytest.raises(ValueError, match="test_clips"):
        sampling.eval_indices(10, sampling="tsn", test_clips="x", **kw)
