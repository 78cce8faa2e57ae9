"""Reading the frames a clip needs: JPEG files of a frame folder, or a video file with PyAV.

Both readers take `pick(num_frames) -> indices` (0-based, any shape) and return uint8 frames of
shape `indices.shape + (H, W, 3)`; each distinct frame is decoded once. Failures raise
`BadSampleError` with a one-line message naming the file.
"""

from __future__ import annotations

import collections
import os
import struct
import threading
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from aia_jax.data.errors import BadSampleError

Pick = Callable[[int], np.ndarray]

# Seek only across gaps longer than this many frames: a seek lands on the keyframe before the
# target and decodes forward from there, which inside one GOP costs more than decoding on.
SEEK_GAP = 32

# What PIL raises for a damaged image file: besides OSError, its plugins raise SyntaxError
# ("broken PNG file"), EOFError and struct.error, and a damaged header that claims a huge size
# raises DecompressionBombError.
IMAGE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)

# Video frames decoded in this process (all readers); tests use it to see that seeking skips work.
decoded_frames = 0


def read_image(path: str) -> np.ndarray:
    """One RGB frame as uint8 `[H, W, 3]`."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise BadSampleError(f"missing frame {path}") from None
    except IMAGE_ERRORS as e:
        raise BadSampleError(f"cannot decode {path}: {e}") from None


def gather(indices: np.ndarray, frames: dict[int, np.ndarray]) -> np.ndarray:
    """Stacks `frames[i]` for every index, in the shape of `indices`.

    Frames of another size than the clip's first (lowest-index) frame are resized to its size:
    the release resizes every frame on its own, so such a clip is readable there too.
    """
    first = frames[min(frames)]
    height, width = first.shape[:2]
    frames = {
        i: f
        if f.shape[:2] == (height, width)
        else np.asarray(Image.fromarray(f).resize((width, height), Image.BILINEAR))
        for i, f in frames.items()
    }
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
    return gather(indices, frames)


# ---------------------------------------------------------------------------------------------
# Video files.


class _SeekMissed(Exception):
    """A seek landed after the frame it aimed at; the caller decodes from the start instead."""


def read_video(path: str, pick: Pick) -> np.ndarray:
    """The picked frames of a video file, decoding only what they need.

    Frame i is the i-th frame in display order, and the frame count is the number of frames in
    the stream, both read from the container's packets (not from the header's frame count or
    frame rate, which are wrong for variable-frame-rate videos and some damaged files).
    Decoding seeks to the keyframe before each far-away needed frame and decodes forward, keeping
    only the needed frames; where seeking is not possible or misses, it decodes from the start.
    """
    import av  # noqa: PLC0415  (optional dependency, imported where videos are read)

    if not os.path.exists(path):
        raise BadSampleError(f"missing video {path}")
    try:
        key = (path, os.path.getmtime(path))
        # One open for both the packet scan (on a cache miss) and the decoding: an open probes
        # the streams (~2 ms for a small mp4), more than the scan itself costs.
        with av.open(path) as container:
            if not container.streams.video:
                raise BadSampleError(f"{path}: no video stream")
            times = _frame_times.get(key)
            scanned = times is None
            if scanned:
                times = _scan_frame_times(container, path)
                _frame_times.put(key, times)
            indices = np.asarray(pick(len(times)))
            wanted = [int(i) for i in np.unique(indices)]
            frames = None
            if times[0] >= 0:
                try:
                    frames = _decode(container, wanted, times, seek=True, scanned=scanned)
                except _SeekMissed:
                    pass
        if frames is None:  # no usable timestamps, or a seek missed: count from the start
            with av.open(path) as container:
                frames = _decode(container, wanted, times, seek=False)
    except av.error.FFmpegError as e:
        raise BadSampleError(f"cannot decode {path}: {e}") from None
    missing = [i for i in wanted if i not in frames]
    if missing:
        raise BadSampleError(
            f"{path}: frame {missing[0]} of {len(times)} did not decode (a damaged stream)"
        )
    return gather(indices, frames)


class _FrameTimesCache:
    """The frame timestamps of the most recently read video files, by (path, mtime).

    Thread-safe: grain reads samples on several threads.
    """

    def __init__(self, maxsize: int) -> None:
        self._maxsize = maxsize
        self._entries: collections.OrderedDict[tuple[str, float], np.ndarray] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def get(self, key: tuple[str, float]) -> np.ndarray | None:
        with self._lock:
            times = self._entries.get(key)
            if times is not None:
                self._entries.move_to_end(key)
            return times

    def put(self, key: tuple[str, float], times: np.ndarray) -> None:
        with self._lock:
            self._entries[key] = times
            if len(self._entries) > self._maxsize:
                self._entries.popitem(last=False)

    def cache_clear(self) -> None:
        with self._lock:
            self._entries.clear()


_frame_times = _FrameTimesCache(maxsize=4096)


def _scan_frame_times(container, path: str) -> np.ndarray:
    """Presentation timestamps of the video stream's frames, sorted (display order).

    Reads every packet, leaving the container at its end. Entries are -1 where a packet has no
    timestamp; such a video is decoded from the start.
    """
    stream = container.streams.video[0]
    pts = [-1 if p.pts is None else p.pts for p in container.demux(stream) if p.size > 0]
    if not pts:
        raise BadSampleError(f"{path}: no video frames")
    times = np.sort(np.asarray(pts, np.int64))
    if times[0] < 0 or np.any(np.diff(times) == 0):
        times[:] = -1  # no timestamps to locate frames by (or ambiguous ones): count instead
    return times


def _decode(
    container, wanted: list[int], times: np.ndarray, *, seek: bool, scanned: bool = False
) -> dict[int, np.ndarray]:
    """Decodes the `wanted` frames (sorted indices into `times`).

    With `seek`, frames are located by their timestamps and far-away ones reached by seeking;
    a container that `scanned` left at its end seeks before its first frame. Without, the
    container must be fresh: frames are counted from the start.
    """
    import av  # noqa: PLC0415

    out: dict[int, np.ndarray] = {}
    stream = container.streams.video[0]

    def index_of(frame, counter: int) -> int:
        if not seek:  # from the start, frames come in display order
            return counter
        i = int(np.searchsorted(times, frame.pts)) if frame.pts is not None else len(times)
        if i == len(times) or times[i] != frame.pts:
            raise _SeekMissed()  # a frame the packets did not announce: count instead
        return i

    frames = container.decode(stream)
    current, counter, k, aimed = -1, 0, 0, -1
    just_sought = False
    while k < len(wanted):
        target = wanted[k]
        if seek and target != aimed and (scanned or target - current > SEEK_GAP):
            aimed, scanned = target, False
            offset = int(times[target])
            try:
                container.seek(offset, backward=True, any_frame=False, stream=stream)
            except av.error.FFmpegError:
                raise _SeekMissed() from None
            frames = container.decode(stream)
            just_sought = True
        frame = next(frames, None)
        if frame is None:
            if just_sought:
                raise _SeekMissed()  # a seek that left nothing to decode, e.g. did not move
            break
        global decoded_frames
        decoded_frames += 1
        index = index_of(frame, counter)
        counter += 1
        if just_sought and index > target:
            raise _SeekMissed()
        just_sought = False
        while k < len(wanted) and wanted[k] < index:
            k += 1  # a frame that did not decode: reported as missing
        if k < len(wanted) and wanted[k] == index:
            out[index] = frame.to_ndarray(format="rgb24")
            k += 1
        current = index
    return out
