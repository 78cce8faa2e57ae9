"""Reading the frames a clip needs: JPEG files of a frame folder, or a video file with PyAV.

Both readers take `pick(num_frames) -> indices` (0-based, any shape) and return uint8 frames of
shape `indices.shape + (H, W, 3)`; each distinct frame is decoded once. Failures raise
`BadSampleError` with a one-line message naming the file.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from aia_jax.data.errors import BadSampleError

Pick = Callable[[int], np.ndarray]

# Seek only across gaps longer than this many frames: a seek lands on the keyframe before the
# target and decodes forward from there, which inside one GOP costs more than decoding on.
SEEK_GAP = 32

# Video frames decoded in this process (all readers); tests use it to see that seeking skips work.
decoded_frames = 0


def read_image(path: str) -> np.ndarray:
    """One RGB frame as uint8 `[H, W, 3]`."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise BadSampleError(f"missing frame {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BadSampleError(f"cannot decode {path}: {e}") from None


def gather(indices: np.ndarray, frames: dict[int, np.ndarray], where: str) -> np.ndarray:
    """Stacks `frames[i]` for every index, in the shape of `indices`."""
    shapes = {f.shape for f in frames.values()}
    if len(shapes) != 1:
        raise BadSampleError(f"{where}: frames of different sizes {sorted(shapes)}")
    flat = [frames[int(i)] for i in indices.reshape(-1)]
    return np.stack(flat).reshape(*indices.shape, *flat[0].shape)


def read_frame_folder(
    folder: str, template: str, num_frames: int, pick: Pick, first_frame: int = 1
) -> np.ndarray:
    """The picked frames of a folder of files `template.format(index + first_frame)`."""
    indices = np.asarray(pick(num_frames))
    frames = {
        int(i): read_image(os.path.join(folder, template.format(int(i) + first_frame)))
        for i in np.unique(indices)
    }
    return gather(indices, frames, folder)


# ---------------------------------------------------------------------------------------------
# Video files.


class _SeekMissed(Exception):
    """A seek landed after the frame it aimed at; the caller decodes from the start instead."""


def read_video(path: str, pick: Pick) -> np.ndarray:
    """The picked frames of a video file, decoding only what they need.

    The frame count comes from the stream header, or from counting packets where the header has
    none (webm). Frame i is the frame on screen at time `i / fps` (frame index from the
    timestamp). Decoding seeks to the keyframe before each far-away needed frame and decodes
    forward, keeping only the needed frames; where seeking is not possible or misses, it decodes
    from the start.
    """
    import av  # noqa: PLC0415  (optional dependency, imported where videos are read)

    if not os.path.exists(path):
        raise BadSampleError(f"missing video {path}")
    try:
        num_frames = _frame_count(path, os.path.getmtime(path))
        indices = np.asarray(pick(num_frames))
        wanted = [int(i) for i in np.unique(indices)]
        try:
            frames = _decode(path, wanted, seek=True)
        except _SeekMissed:
            frames = _decode(path, wanted, seek=False)
    except av.error.FFmpegError as e:
        raise BadSampleError(f"cannot decode {path}: {e}") from None
    missing = [i for i in wanted if i not in frames]
    if missing:
        raise BadSampleError(
            f"{path}: stream ended before frame {missing[0]} (header says {num_frames} frames)"
        )
    return gather(indices, frames, path)


@functools.lru_cache(maxsize=4096)
def _frame_count(path: str, mtime: float) -> int:
    del mtime  # part of the cache key only
    import av  # noqa: PLC0415

    with av.open(path) as container:
        if not container.streams.video:
            raise BadSampleError(f"{path}: no video stream")
        stream = container.streams.video[0]
        count = stream.frames
        if count <= 0:
            count = sum(1 for p in container.demux(stream) if p.size > 0)
    if count <= 0:
        raise BadSampleError(f"{path}: no video frames")
    return count


def _decode(path: str, wanted: list[int], seek: bool) -> dict[int, np.ndarray]:
    import av  # noqa: PLC0415

    out: dict[int, np.ndarray] = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        time_base = stream.time_base
        start = stream.start_time or 0
        seconds_per_frame = 1 / rate if rate else None

        def index_of(frame, counter: int) -> int:
            if frame.pts is None or not seconds_per_frame or not time_base:
                if seek:  # timestamps are what a seek is located by
                    raise _SeekMissed()
                return counter
            return int(round(float((frame.pts - start) * time_base / seconds_per_frame)))

        seek = seek and seconds_per_frame is not None and time_base is not None
        frames = container.decode(stream)
        current, previous, counter, k, aimed = -1, None, 0, 0, -1
        just_sought = False
        while k < len(wanted):
            target = wanted[k]
            if seek and target != aimed and target - current > SEEK_GAP:
                aimed = target
                offset = start + int(target * seconds_per_frame / time_base)
                try:
                    container.seek(offset, backward=True, any_frame=False, stream=stream)
                except av.error.FFmpegError:
                    raise _SeekMissed() from None
                frames = container.decode(stream)
                previous, just_sought = None, True
            frame = next(frames, None)
            if frame is None:
                break
            global decoded_frames
            decoded_frames += 1
            index = index_of(frame, counter)
            counter += 1
            if just_sought and index > target:
                raise _SeekMissed()
            just_sought = False
            # A timestamp gap: the wanted times before this frame showed the previous frame (or,
            # before the first frame, this one).
            while k < len(wanted) and wanted[k] < index:
                shown = previous if previous is not None else frame
                out[wanted[k]] = shown.to_ndarray(format="rgb24")
                k += 1
            if k < len(wanted) and wanted[k] == index:
                out[index] = frame.to_ndarray(format="rgb24")
                k += 1
            current, previous = index, frame
    return out
