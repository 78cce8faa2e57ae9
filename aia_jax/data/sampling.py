"""Which frames of a video a clip is made of: the release's TSN rules and I3D-style dense clips.

Pure numpy. Every function takes the number of frames `num_frames` of a video and returns 0-based
frame indices (the frame files of the lists are 1-based: file number = index + 1). Train rules
take a `np.random.Generator`; evaluation rules are deterministic. Shapes: `[T]` for one clip,
`[num_clips, T]` for several.
"""

from __future__ import annotations

import numpy as np

DENSE_WINDOW = 64  # frames a TSM "dense" clip spans; its stride is DENSE_WINDOW // T


def tsn_train(num_frames: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """One random frame in each of `num_segments` equal segments (TSN training).

    With `d = num_frames // T`: if `d > 0`, frame `i * d + randint(d)` for segment i (frames past
    `T * d` are never used); else (a video shorter than T) all T indices are 0, as in the release.
    """
    t = num_segments
    duration = num_frames // t
    if duration > 0:
        return np.arange(t) * duration + rng.integers(duration, size=t)
    return np.zeros(t, dtype=np.int64)


def tsn_centre(num_frames: int, num_segments: int) -> np.ndarray:
    """The centre frame of each segment (TSN validation).

    With `tick = num_frames / T`: frame `int(tick / 2 + tick * i)` for segment i when
    `num_frames > T`; otherwise (T or fewer frames, as in the release's validation) all zeros.
    """
    t = num_segments
    if num_frames > t:
        tick = num_frames / t
        return np.array([int(tick / 2.0 + tick * i) for i in range(t)])
    return np.zeros(t, dtype=np.int64)


def tsn_twice(num_frames: int, num_segments: int) -> np.ndarray:
    """Two clips (the release's "twice" test sampling): segment centres, then segment starts.

    With `tick = num_frames / T`: clip 0 is `int(tick / 2 + tick * i)`, clip 1 `int(tick * i)`,
    for every video length (a short video repeats frames). Returns `[2, T]`.
    """
    t = num_segments
    tick = num_frames / t
    centres = [int(tick / 2.0 + tick * i) for i in range(t)]
    starts = [int(tick * i) for i in range(t)]
    return np.array([centres, starts])


def tsn_dense(num_frames: int, num_segments: int, num_clips: int = 10) -> np.ndarray:
    """Ten clips of T frames with a stride of `64 // T` (the release's "dense" test sampling).

    The clip starts are `linspace(0, max(1, num_frames - 63) - 1, num_clips)` truncated to ints;
    frame j of a clip starting at s is `(s + j * (64 // T)) % num_frames` (short videos wrap
    around). Returns `[num_clips, T]`.
    """
    t = num_segments
    stride = DENSE_WINDOW // t
    last_start = max(1, 1 + num_frames - DENSE_WINDOW)
    starts = np.linspace(0, last_start - 1, num=num_clips, dtype=int)
    return (starts[:, None] + np.arange(t)[None, :] * stride) % num_frames


def dense3d_train(
    num_frames: int,
    clip_len: int,
    frame_interval: int,
    num_clips: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """`num_clips` clips of `clip_len` frames `frame_interval` apart (I3D training).

    A clip spans `span = clip_len * frame_interval` frames. With
    `avg = (num_frames - span + 1) // num_clips`: if `avg > 0` clip k starts at
    `k * avg + randint(avg)`; else if `num_frames > max(num_clips, span)` the starts are sorted
    random ints in `[0, num_frames - span]`; else if `avg == 0` they are
    `round(k * (num_frames - span + 1) / num_clips)`; else (a video shorter than the span) 0.
    Frame j of a clip starting at s is `(s + j * frame_interval) % num_frames` (loop). Returns
    `[num_clips, clip_len]`.
    """
    span = clip_len * frame_interval
    avg = (num_frames - span + 1) // num_clips
    if avg > 0:
        starts = np.arange(num_clips) * avg + rng.integers(avg, size=num_clips)
    elif num_frames > max(num_clips, span):
        starts = np.sort(rng.integers(num_frames - span + 1, size=num_clips))
    elif avg == 0:
        ratio = (num_frames - span + 1) / num_clips
        starts = np.around(np.arange(num_clips) * ratio).astype(np.int64)
    else:
        starts = np.zeros(num_clips, dtype=np.int64)
    return _clip_frames(starts, clip_len, frame_interval, num_frames)


def dense3d_test(num_frames: int, clip_len: int, frame_interval: int, num_clips: int) -> np.ndarray:
    """`num_clips` evenly spread clips (I3D evaluation).

    With `avg = (num_frames - span + 1) / num_clips` (float): clip k starts at
    `int(k * avg + avg / 2)` when `num_frames >= span`, else at 0; frames loop as in training.
    Returns `[num_clips, clip_len]`.
    """
    span = clip_len * frame_interval
    avg = (num_frames - span + 1) / num_clips
    if num_frames > span - 1:
        starts = (np.arange(num_clips) * avg + avg / 2.0).astype(np.int64)
    else:
        starts = np.zeros(num_clips, dtype=np.int64)
    return _clip_frames(starts, clip_len, frame_interval, num_frames)


def _clip_frames(
    starts: np.ndarray, clip_len: int, frame_interval: int, num_frames: int
) -> np.ndarray:
    return (starts[:, None] + np.arange(clip_len)[None, :] * frame_interval) % num_frames


def train_indices(
    num_frames: int,
    *,
    sampling: str,
    num_segments: int,
    clip_len: int,
    frame_interval: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Training clip: `[T]` frame indices under `sampling` ('tsn' or 'dense3d')."""
    if sampling == "tsn":
        return tsn_train(num_frames, num_segments, rng)
    if sampling == "dense3d":
        return dense3d_train(num_frames, clip_len, frame_interval, 1, rng)[0]
    raise ValueError(f"unknown sampling {sampling!r}; expected 'tsn' or 'dense3d'")


EVAL_CLIPS = {"single": 1, "twice": 2, "dense": 10}


def eval_indices(
    num_frames: int,
    *,
    sampling: str,
    test_clips: str,
    num_segments: int,
    clip_len: int,
    frame_interval: int,
) -> np.ndarray:
    """Evaluation clips: `[C, T]` frame indices, C = 1 ('single'), 2 ('twice') or 10 ('dense').

    TSN: 'single' is `tsn_centre`, 'twice' `tsn_twice`, 'dense' `tsn_dense`. dense3d: C clips from
    `dense3d_test`.
    """
    if test_clips not in EVAL_CLIPS:
        raise ValueError(f"unknown test_clips {test_clips!r}; expected one of {list(EVAL_CLIPS)}")
    if sampling == "tsn":
        if test_clips == "single":
            return tsn_centre(num_frames, num_segments)[None]
        if test_clips == "twice":
            return tsn_twice(num_frames, num_segments)
        return tsn_dense(num_frames, num_segments)
    if sampling == "dense3d":
        return dense3d_test(num_frames, clip_len, frame_interval, EVAL_CLIPS[test_clips])
    raise ValueError(f"unknown sampling {sampling!r}; expected 'tsn' or 'dense3d'")
