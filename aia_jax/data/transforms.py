"""Frame geometry of the release: resize, multi-scale corner crops, flips and test-time views.

Pure numpy (PIL for the bilinear resizes). Frames are uint8 `[N, H, W, 3]`; a clip keeps one crop
box for all its frames. Boxes are `(top, left, height, width)` in pixels of the resized frames.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

SCALES = (1.0, 0.875, 0.75, 0.66)


class Box(NamedTuple):
    top: int
    left: int
    height: int
    width: int


class View(NamedTuple):
    """One test view of a clip: where it is cut and whether it is mirrored."""

    box: Box
    flipped: bool


# ---------------------------------------------------------------------------------------------
# Resizing.


def resized_shape(
    height: int, width: int, resize: Sequence[int], short_side: int = 0
) -> tuple[int, int]:
    """Target `(h, w)`: `resize` as given, or with `short_side > 0` the short side set to it.

    The short-side rule keeps the aspect ratio, the long side truncated: `int(s * long / short)`.
    """
    if short_side > 0:
        if height <= width:
            return short_side, int(short_side * width / height)
        return int(short_side * height / width), short_side
    return int(resize[0]), int(resize[1])


def resize(frames: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Bilinear resize of every frame to `shape = (h, w)`; a no-op when already that size."""
    h, w = int(shape[0]), int(shape[1])
    if frames.shape[1:3] == (h, w):
        return frames
    out = np.empty((frames.shape[0], h, w, frames.shape[3]), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(frame).resize((w, h), Image.BILINEAR))
    return out


def crop(frames: np.ndarray, box: Box) -> np.ndarray:
    return frames[:, box.top : box.top + box.height, box.left : box.left + box.width]


def crop_resize(frames: np.ndarray, box: Box, size: int) -> np.ndarray:
    """Crop `box` then resize it to `size x size` (the release crops first, then resizes)."""
    return resize(np.ascontiguousarray(crop(frames, box)), (size, size))


def hflip(frames: np.ndarray) -> np.ndarray:
    return frames[:, :, ::-1]


# ---------------------------------------------------------------------------------------------
# Crop boxes.


def fixed_offsets(
    height: int, width: int, crop_h: int, crop_w: int, more: bool = True
) -> list[tuple[int, int]]:
    """The release's fixed crop positions `(top, left)` on a grid of quarter steps.

    Steps are `(H - crop_h) // 4` and `(W - crop_w) // 4`. The five basic positions: top-left,
    top-right, bottom-left, bottom-right, centre (at step 4, 2 or 0 of each axis); `more` adds
    eight: middle-left, middle-right, bottom-centre, top-centre and the four quarter points.
    """
    hs, ws = (height - crop_h) // 4, (width - crop_w) // 4
    grid = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]
    if more:
        grid += [(2, 0), (2, 4), (4, 2), (0, 2), (1, 1), (1, 3), (3, 1), (3, 3)]
    return [(i * hs, j * ws) for i, j in grid]


def multiscale_sizes(
    height: int, width: int, crop_size: int, scales: Sequence[float], max_distort: int = 1
) -> list[tuple[int, int]]:
    """Candidate `(crop_h, crop_w)`: scale pairs of the short side at most `max_distort` apart.

    Each side is `int(short * scale)`, snapped to `crop_size` when within 3 pixels of it.
    """
    base = min(height, width)
    sizes = [int(base * s) for s in scales]
    sizes = [crop_size if abs(s - crop_size) < 3 else s for s in sizes]
    return [
        (h, w)
        for i, h in enumerate(sizes)
        for j, w in enumerate(sizes)
        if abs(i - j) <= max_distort
    ]


def sample_multiscale_box(
    height: int,
    width: int,
    crop_size: int,
    scales: Sequence[float],
    rng: np.random.Generator,
) -> Box:
    """A uniformly drawn candidate size at a uniformly drawn fixed position (13 positions)."""
    sizes = multiscale_sizes(height, width, crop_size, scales)
    ch, cw = sizes[rng.integers(len(sizes))]
    offsets = fixed_offsets(height, width, ch, cw, more=True)
    top, left = offsets[rng.integers(len(offsets))]
    return Box(top, left, ch, cw)


def centre_box(height: int, width: int, size: int) -> Box:
    """A `size x size` box in the middle, offsets rounded half to even like the release."""
    return Box(int(round((height - size) / 2.0)), int(round((width - size) / 2.0)), size, size)


def three_crop_boxes(height: int, width: int, size: int = 0) -> list[Box]:
    """Full-resolution 3 crops: squares of the short side (or `size`) at start, end and middle.

    The positions run along the long side (left/right/centre for landscape frames, top/bottom/
    centre for portrait ones) at quarter steps 0, 4 and 2 of the free length, centred across it.
    """
    size = size or min(height, width)
    hs, ws = (height - size) // 4, (width - size) // 4
    if width >= height:
        return [Box(2 * hs, j * ws, size, size) for j in (0, 4, 2)]
    return [Box(i * hs, 2 * ws, size, size) for i in (0, 4, 2)]


def corner_views(height: int, width: int, size: int, flips: bool) -> list[View]:
    """5 crops (4 corners and centre at quarter steps); with `flips`, each followed by its mirror.

    So 10-crop views are ordered: top-left, top-left mirrored, top-right, top-right mirrored, …
    """
    views = []
    for top, left in fixed_offsets(height, width, size, size, more=False):
        views.append(View(Box(top, left, size, size), False))
        if flips:
            views.append(View(Box(top, left, size, size), True))
    return views


# ---------------------------------------------------------------------------------------------
# Labels under a horizontal flip.


def flip_table(flip_map: Any, num_classes: int) -> np.ndarray:
    """Label lookup after a horizontal flip, `table[label]`; identity where the map is silent.

    `flip_map`: a mapping `{label: flipped_label}` (keys may be strings, one direction each) or a
    sequence of pairs `(a, b)` that swap both ways.
    """
    table = np.arange(max(num_classes, 0), dtype=np.int32)
    if not flip_map:
        return table
    if isinstance(flip_map, Mapping) or hasattr(flip_map, "items"):
        items = [(int(k), int(v)) for k, v in flip_map.items()]
    else:
        items = []
        for pair in flip_map:
            try:
                a, b = (int(x) for x in pair)
            except (TypeError, ValueError):
                raise ValueError(f"entry {pair!r}: expected a pair of labels (a, b)") from None
            items += [(a, b), (b, a)]
    for a, b in items:
        if not (0 <= a < num_classes and 0 <= b < num_classes):
            raise ValueError(f"flip_map entry {a}->{b} is outside [0, {num_classes})")
        table[a] = b
    return table


# ---------------------------------------------------------------------------------------------
# The per-sample transforms.


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The spatial part of a data config."""

    resize: tuple[int, int] = (240, 320)
    resize_short_side: int = 0
    crop_size: int = 224
    scales: tuple[float, ...] = SCALES
    flip: bool = True
    test_crops: int = 1

    @classmethod
    def from_config(cls, config: Any) -> Geometry:
        return cls(
            resize=tuple(int(x) for x in config.resize),
            resize_short_side=int(config.get("resize_short_side", 0) or 0),
            crop_size=int(config.crop_size),
            scales=tuple(float(s) for s in config.scales),
            flip=bool(config.flip),
            test_crops=int(config.test_crops),
        )

    def target_shape(self, height: int, width: int) -> tuple[int, int]:
        return resized_shape(height, width, self.resize, self.resize_short_side)


def train_clip(
    frames: np.ndarray,
    label: int,
    geometry: Geometry,
    flip_lut: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """Resize, multi-scale crop to `crop_size`, and (p = 0.5) mirror with the label flipped."""
    frames = resize(frames, geometry.target_shape(*frames.shape[1:3]))
    box = sample_multiscale_box(*frames.shape[1:3], geometry.crop_size, geometry.scales, rng)
    clip = crop_resize(frames, box, geometry.crop_size)
    if geometry.flip and rng.random() < 0.5:
        clip = hflip(clip)
        label = int(flip_lut[label])
    return np.ascontiguousarray(clip), label


def test_views(height: int, width: int, geometry: Geometry) -> list[View]:
    """The views of one resized clip for `test_crops` 1 (centre), 3 (full-res), 5 or 10."""
    size, crops = geometry.crop_size, geometry.test_crops
    if crops == 1:
        return [View(centre_box(height, width, size), False)]
    if crops == 3:
        return [View(b, False) for b in three_crop_boxes(height, width)]
    if crops in (5, 10):
        return corner_views(height, width, size, flips=crops == 10)
    raise ValueError(f"test_crops must be 1, 3, 5 or 10, got {crops}")


def view_size(geometry: Geometry, height: int, width: int) -> int:
    """Side of the square views: the short side for 3 full-res crops, else `crop_size`."""
    if geometry.test_crops == 3:
        return min(geometry.target_shape(height, width))
    return geometry.crop_size


def eval_clips(clips: np.ndarray, geometry: Geometry) -> np.ndarray:
    """`[C, T, H, W, 3]` decoded clips → `[C * V, T, s, s, 3]` views, clip-major."""
    c, t = clips.shape[:2]
    frames = resize(
        clips.reshape(c * t, *clips.shape[2:]), geometry.target_shape(*clips.shape[2:4])
    )
    frames = frames.reshape(c, t, *frames.shape[1:])
    views = []
    for clip in frames:
        for view in test_views(*clip.shape[1:3], geometry):
            out = crop(clip, view.box)
            views.append(hflip(out) if view.flipped else out)
    return np.ascontiguousarray(np.stack(views))
