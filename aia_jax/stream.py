"""Classify a live stream: a webcam, a network stream or a video file read as one.

    python -m aia_jax.predict --checkpoint DIR --stream /dev/video0 --input-format v4l2
    python -m aia_jax.predict --checkpoint DIR --stream rtsp://camera/stream
    python -m aia_jax.predict --checkpoint DIR --stream video.mp4 --json

The networks classify whole clips, so a stream is classified over a sliding window: the last
`window_seconds` of frames (at the stream's frame rate; `DEFAULT_FPS` where it says none, or
one outside [`MIN_FPS`, `MAX_FPS`]), sampled as `predict` samples a video
(`num_segments` segment centres, or the dense clip of a `dense3d` workdir), every `every` new
frames (a window is never shorter than the clip it samples: a dense clip spans
`(clip_len - 1) * frame_interval + 1` frames). Each frame is resized and centre-cropped once, as
it arrives, so the window holds only `crop_size`² frames. A window is predicted as soon as it is
full; a stream that ends earlier is predicted once over what it gave, and one that ends before
its first frame is an error.

Live sources (`realtime`) are decoded on a thread of their own and each prediction takes the
newest window, so a network slower than the camera skips windows instead of falling behind; a
file is read frame by frame, every window predicted, and the output is reproducible.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from aia_jax.errors import UserError, checked_positive_int

DEFAULT_FPS = 25.0  # where the stream does not say its frame rate, or says an implausible one
# Frame rates trusted from a container. Outside, it is a time base or a broken header (a live
# MPEG-TS stream saying 90000 fps), and `window_seconds` of it would be a window of millions of
# frames, or of less than one.
MIN_FPS, MAX_FPS = 1.0, 1000.0


def is_live(source: str, input_format: str | None = None) -> bool:
    """Whether `source` is read as a live stream: a device (`input_format`) or a URL."""
    return bool(input_format) or "://" in source


def open_source(
    source: str, input_format: str | None = None, options: Mapping[str, str] | None = None
) -> Any:
    """The PyAV container of `source`, or a one-line `UserError` naming it."""
    import av  # noqa: PLC0415  (optional dependency, imported where videos are read)

    try:
        container = av.open(source, format=input_format or None, options=dict(options or {}))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        how = f" (input format {input_format!r})" if input_format else ""
        raise UserError(f"{source}: cannot open the stream{how}: {e}") from None
    if not container.streams.video:
        container.close()
        raise UserError(f"{source}: no video stream")
    return container


def frame_rate(container: Any, source: str = "") -> float | None:
    """Frames per second of the first video stream, where the container says a plausible rate.

    A rate outside [`MIN_FPS`, `MAX_FPS`] is not trusted: None, with a warning naming `source`
    (the caller then uses `DEFAULT_FPS`).
    """
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        return None
    fps = float(rate)
    if not MIN_FPS <= fps <= MAX_FPS:  # also NaN
        logging.warning(
            "%s: the stream says %g frames per second, outside [%g, %g]: taking %g (a window "
            "is window_seconds × %g frames)",
            source or "the stream",
            fps,
            MIN_FPS,
            MAX_FPS,
            DEFAULT_FPS,
            DEFAULT_FPS,
        )
        return None
    return fps


def decoded_frames(container: Any, source: str) -> Iterator[tuple[float | None, np.ndarray]]:
    """`(seconds or None, uint8 [H, W, 3])` of each frame of the first video stream."""
    import av  # noqa: PLC0415

    try:
        for frame in container.decode(video=0):
            yield frame.time, frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as e:
        raise UserError(f"{source}: cannot decode the stream: {e}") from None


class _Window:
    """The last `size` pre-processed frames; a reader thread appends, predictions snapshot."""

    def __init__(self, size: int) -> None:
        self.frames: collections.deque[np.ndarray] = collections.deque(maxlen=size)
        self.seen = 0  # frames appended so far
        self.time: float | None = None  # of the newest frame
        self.ended = False
        self.error: BaseException | None = None
        self.changed = threading.Condition()

    def append(self, frame: np.ndarray, time: float | None) -> None:
        with self.changed:
            self.frames.append(frame)
            self.seen += 1
            self.time = time
            self.changed.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self.changed:
            self.ended, self.error = True, error
            self.changed.notify_all()


def predict_stream(
    checkpoint: str,
    source: str,
    *,
    input_format: str | None = None,
    options: Mapping[str, str] | None = None,
    window_seconds: float = 2.0,
    every: int | None = None,
    realtime: bool | None = None,
    class_names: Sequence[str] | None = None,
    top: int = 5,
    resize: Sequence[int] | None = None,
    crop_size: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Top classes over a sliding window of a stream, one dict per prediction.

    Args:
      checkpoint: a model directory or training workdir (pre-processing as in `predict`).
      source: what FFmpeg opens: a file, a URL, or a device with `input_format`.
      input_format: FFmpeg's input format for devices ('v4l2', 'avfoundation', 'dshow').
      options: FFmpeg input options, e.g. `{'video_size': '640x480', 'framerate': '30'}`.
      window_seconds: length of the window a prediction sees.
      every: frames between predictions (default a quarter of the window).
      realtime: decode on a thread and predict the newest window (default: live sources).
      class_names, top, resize, crop_size: as in `predict.predict`.

    Yields:
      `{'frame', 'time', 'window', 'fps', 'logits' [K], 'top': [...]}`: the index and time (s,
      or None) of the window's last frame, the window's length in frames, the frame rate used.
    """
    from aia_jax import modelio, predict
    from aia_jax.data import transforms

    if window_seconds <= 0:
        raise UserError(f"window_seconds {window_seconds}: expected a positive number")
    if every is not None and every < 1:
        raise UserError(f"every {every}: expected a positive number of frames")
    top = checked_positive_int("top", top)
    variables, meta = modelio.load_model(checkpoint)
    model = modelio.create_model(meta)
    class_names = predict.checked_class_names(checkpoint, meta, model.num_classes, class_names)
    settings = predict.preprocessing_settings(checkpoint, resize=resize, crop_size=crop_size)
    geometry = predict.eval_geometry(settings)
    container = open_source(source, input_format, options)
    fps = frame_rate(container, source) or DEFAULT_FPS
    # A window shorter than the clip would wrap it around (a dense clip of 8 frames 8 apart
    # spans 57 frames, more than 2 s at 25 fps): such a window is widened to fit the clip.
    size = max(predict.clip_span(model.num_segments, settings), round(window_seconds * fps))
    every = every or max(1, size // 4)
    live = is_live(source, input_format) if realtime is None else realtime
    window = _Window(size)

    def preprocessed(frame: np.ndarray) -> np.ndarray:
        # Resize and crop act on each frame alone: done once, as the frame arrives.
        return transforms.eval_clips(frame[None, None], geometry)[0, 0]

    def prediction() -> dict[str, Any]:
        with window.changed:
            frames, seen, time = list(window.frames), window.seen, window.time
        indices = predict.frame_indices(len(frames), model.num_segments, settings)
        clip = np.stack([frames[int(i)] for i in indices])[None]
        logits = predict.predict_clip(model, variables, clip)[0]
        return {
            "frame": seen - 1,
            "time": time,
            "window": len(frames),
            "fps": fps,
            "logits": logits,
            "top": predict.top_classes(logits, class_names, top),
        }

    def due(last: int) -> bool:
        return window.seen >= size and (last == 0 or window.seen - last >= every)

    if not live:
        try:
            last = 0  # frames seen at the last prediction
            for time, frame in decoded_frames(container, source):
                window.append(preprocessed(frame), time)
                if due(last):
                    last = window.seen
                    yield prediction()
            if not window.seen:
                raise UserError(f"{source}: the stream ended before its first video frame")
            if last == 0:
                yield prediction()  # a stream shorter than the window
        finally:
            container.close()
        return

    stop = threading.Event()

    def read() -> None:
        try:
            for time, frame in decoded_frames(container, source):
                if stop.is_set():
                    break
                window.append(preprocessed(frame), time)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises
            window.finish(e)
        else:
            window.finish()
        finally:
            container.close()  # here: the container is this thread's while it decodes

    threading.Thread(target=read, name="aia-stream-reader", daemon=True).start()
    try:
        last = 0
        while True:
            with window.changed:
                window.changed.wait_for(lambda last=last: window.ended or due(last))
                ready, seen, ended, error = due(last), window.seen, window.ended, window.error
            if error is not None:
                raise error
            if ended and not seen:
                raise UserError(f"{source}: the stream ended before its first video frame")
            if ready or (ended and seen and last == 0):
                last = seen
                yield prediction()
            elif ended:
                return
    finally:
        stop.set()


def format_stream_prediction(result: Mapping[str, Any]) -> str:
    """One line: the window's last frame and time, then the top classes and probabilities."""
    when = f"{result['time']:.2f} s" if result["time"] is not None else "time unknown"
    top = ", ".join(f"{t['name']} {t['probability']:.3f}" for t in result["top"])
    return f"frame {result['frame']} ({when}): {top}"
