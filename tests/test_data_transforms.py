"""Geometry of every transform: crop boxes, flips with labels, 3-crop and 10-crop views."""

import numpy as np
import pytest

from aia_jax.data import transforms
from aia_jax.data.transforms import Box, Geometry


def coordinate_frames(n: int, h: int, w: int) -> np.ndarray:
    """Frames whose red is the column, green the row and blue the frame number (all < 256)."""
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    frames = np.zeros((n, h, w, 3), np.uint8)
    frames[..., 0], frames[..., 1] = xx, yy
    frames[..., 2] = np.arange(n)[:, None, None]
    return frames


def test_resized_shape():
    assert transforms.resized_shape(100, 200, (240, 320)) == (240, 320)
    assert transforms.resized_shape(240, 320, (240, 320), short_side=256) == (256, 341)
    assert transforms.resized_shape(320, 240, (240, 320), short_side=256) == (341, 256)


def test_resize_is_bilinear_and_skips_same_size():
    frames = coordinate_frames(2, 6, 8)
    assert transforms.resize(frames, (6, 8)) is frames
    out = transforms.resize(frames, (12, 16))
    assert out.shape == (2, 12, 16, 3) and out.dtype == np.uint8
    assert np.all(np.diff(out[0, 0, :, 0].astype(int)) >= 0)  # columns still increase


def test_fixed_offsets_thirteen_positions():
    # 240 x 320 frame, 224 crop: steps (16 // 4, 96 // 4) = (4, 24).
    got = transforms.fixed_offsets(240, 320, 224, 224)
    assert got == [
        (0, 0), (0, 96), (16, 0), (16, 96), (8, 48),
        (8, 0), (8, 96), (16, 48), (0, 48),
        (4, 24), (4, 72), (12, 24), (12, 72),
    ]  # fmt: skip
    assert transforms.fixed_offsets(240, 320, 224, 224, more=False) == got[:5]


def test_multiscale_sizes():
    # Short side 240: int(240 * s) = 240, 210, 180, 158; pairs at most one scale apart.
    got = transforms.multiscale_sizes(240, 320, 224, transforms.SCALES)
    assert got == [
        (240, 240), (240, 210), (210, 240), (210, 210), (210, 180),
        (180, 210), (180, 180), (180, 158), (158, 180), (158, 158),
    ]  # fmt: skip
    # Sizes within 3 px of the crop size snap to it: int(255 * .875) = 223 → 224.
    assert (224, 224) in transforms.multiscale_sizes(255, 300, 224, transforms.SCALES)


def test_sample_multiscale_box_covers_all_candidates():
    rng = np.random.default_rng(0)
    sizes, starts = set(), set()
    for _ in range(2000):
        box = transforms.sample_multiscale_box(240, 320, 224, transforms.SCALES, rng)
        assert (box.height, box.width) in transforms.multiscale_sizes(
            240, 320, 224, transforms.SCALES
        )
        offsets = transforms.fixed_offsets(240, 320, box.height, box.width)
        assert (box.top, box.left) in offsets
        assert box.top + box.height <= 240 and box.left + box.width <= 320
        sizes.add((box.height, box.width))
        starts.add(offsets.index((box.top, box.left)))
    assert len(sizes) == 10 and starts == set(range(13))


def test_centre_box():
    assert transforms.centre_box(240, 320, 224) == Box(8, 48, 224, 224)
    assert transforms.centre_box(100, 101, 50) == Box(25, 26, 50, 50)  # round(25.5) = 26


def test_three_crop_boxes_along_long_side():
    # Full resolution: squares of the short side 240; steps (320 - 240) // 4 = 20.
    assert transforms.three_crop_boxes(240, 320) == [
        Box(0, 0, 240, 240),
        Box(0, 80, 240, 240),
        Box(0, 40, 240, 240),
    ]
    assert transforms.three_crop_boxes(320, 240) == [
        Box(0, 0, 240, 240),
        Box(80, 0, 240, 240),
        Box(40, 0, 240, 240),
    ]


def test_ten_crop_views():
    views = transforms.corner_views(240, 320, 224, flips=True)
    assert [v.box[:2] for v in views[::2]] == [(0, 0), (0, 96), (16, 0), (16, 96), (8, 48)]
    assert [v.flipped for v in views] == [False, True] * 5
    assert all(a.box == b.box for a, b in zip(views[::2], views[1::2]))
    assert len(transforms.corner_views(240, 320, 224, flips=False)) == 5


def test_eval_clips_cut_and_mirror_the_right_pixels():
    clips = coordinate_frames(2 * 3, 24, 32).reshape(2, 3, 24, 32, 3)  # 2 clips of 3 frames
    geometry = Geometry(resize=(24, 32), crop_size=16, test_crops=10)
    views = transforms.eval_clips(clips, geometry)
    assert views.shape == (20, 3, 16, 16, 3)
    # View 2 is the top-right corner: left = 4 * ((32 - 16) // 4) = 16.
    assert views[2, 0, 0, 0, 0] == 16 and views[2, 0, 0, 0, 1] == 0
    # View 3 is its mirror: the first column is the last of the crop.
    np.testing.assert_array_equal(views[3], views[2][:, :, ::-1])
    # Clip-major: views 10.. come from the second clip (blue = frame number 3..5).
    assert views[10, 0, 0, 0, 2] == 3
    three = transforms.eval_clips(clips, Geometry(resize=(24, 32), test_crops=3))
    assert three.shape == (6, 3, 24, 24, 3)
    assert [int(three[k, 0, 0, 0, 0]) for k in range(3)] == [0, 8, 4]
    one = transforms.eval_clips(clips, Geometry(resize=(24, 32), crop_size=16, test_crops=1))
    assert one.shape == (2, 3, 16, 16, 3) and one[0, 0, 0, 0, 0] == 8 and one[0, 0, 0, 0, 1] == 4


def test_flip_table():
    pairs = transforms.flip_table([(86, 87), (93, 94), (166, 167)], 174)
    assert pairs[86] == 87 and pairs[87] == 86 and pairs[167] == 166 and pairs[0] == 0
    one_way = transforms.flip_table({"1": 2, "2": 1}, 4)
    np.testing.assert_array_equal(one_way, [0, 2, 1, 3])
    np.testing.assert_array_equal(transforms.flip_table(None, 3), [0, 1, 2])
    with pytest.raises(ValueError, match="outside"):
        transforms.flip_table([(1, 9)], 4)


def test_train_clip_flips_pixels_and_label_together():
    frames = coordinate_frames(4, 24, 32)
    lut = transforms.flip_table([(0, 1)], 2)
    geometry = Geometry(resize=(24, 32), crop_size=16, scales=(1.0,))
    flipped = 0
    for seed in range(40):
        clip, label = transforms.train_clip(frames, 0, geometry, lut, np.random.default_rng(seed))
        assert clip.shape == (4, 16, 16, 3)
        columns = clip[0, 8, :, 0].astype(int)
        mirrored = columns[0] > columns[-1]
        assert label == (1 if mirrored else 0)
        flipped += mirrored
    assert 5 < flipped < 35
    no_flip = Geometry(resize=(24, 32), crop_size=16, scales=(1.0,), flip=False)
    for seed in range(10):
        _, label = transforms.train_clip(frames, 0, no_flip, lut, np.random.default_rng(seed))
        assert label == 0


def test_train_clip_crops_a_candidate_box_then_resizes():
    frames = coordinate_frames(1, 240, 320)
    clip, _ = transforms.train_clip(
        frames, 0, Geometry(crop_size=112, flip=False), np.arange(1), np.random.default_rng(3)
    )
    # Replay the draws: the box is a candidate size at a fixed offset.
    rng = np.random.default_rng(3)
    box = transforms.sample_multiscale_box(240, 320, 112, transforms.SCALES, rng)
    expected = transforms.crop_resize(frames, box, 112)
    np.testing.assert_array_equal(clip, expected)
    assert clip.shape == (1, 112, 112, 3)
