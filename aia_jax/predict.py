"""Classify one video: a video file (PyAV) or a folder of frames (image files in sorted order).

    python -m aia_jax.predict --checkpoint DIR VIDEO_OR_FRAME_DIR [--classnames FILE] [--top 5]

Pre-processing is the release's validation protocol: `num_segments` frames at the segment
centres (T from the model directory's `model.json`; a workdir trained with `dense3d` sampling
uses its evenly spread clip instead), every frame resized as in training, one centre crop.
Sizes come from the training config when the checkpoint is a workdir (`config.json`), else the
release's defaults (resize to 240x320, crop 224); `--resize`/`--crop-size` override them. A
folder holding frames of several kinds (TSN/mmaction rawframes: `img_*` beside `flow_x_*`,
`flow_y_*`) is read through `--filename-template` (default: the workdir config's).

Class names: `--classnames FILE` (one per line), else what the checkpoint records (`model.json`
`class_names`/`classnames`, or the workdir config's dataset), else class numbers.

A live stream (a webcam, a network stream, or a file read as one) is classified over a sliding
window with `--stream` (see `aia_jax.stream`):

    python -m aia_jax.predict --checkpoint DIR --stream /dev/video0 --input-format v4l2
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aia_jax import xla_cpu
from aia_jax.errors import (
    ArgumentParser,
    InputNotFoundError,
    UserError,
    checked_positive_int,
    positive_int,
    reported_as_usage_errors,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULTS = {
    "resize": (240, 320),
    "resize_short_side": 0,
    "crop_size": 224,
    "sampling": "tsn",
    "clip_len": 0,
    "frame_interval": 8,
    # Frame files to read from a folder holding several kinds (e.g. 'img_{:05d}.jpg' beside
    # the flow_x_/flow_y_ files of TSN/mmaction rawframes); '' = all its images.
    "filename_template": "",
}
CONFIG_FILE = "config.json"  # written by the trainer into a workdir
STREAM_WINDOW_SECONDS = 2.0  # --window-seconds when not given


# ---------------------------------------------------------------------------------------------
# What the checkpoint says about pre-processing and classes.


def _training_config(checkpoint: str) -> dict[str, Any] | None:
    path = os.path.join(checkpoint, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def preprocessing_settings(checkpoint: str, **overrides: Any) -> dict[str, Any]:
    """Resize, crop and sampling settings: `overrides` (not None), the workdir config, defaults."""
    settings = dict(DEFAULTS)
    data_cfg = (_training_config(checkpoint) or {}).get("data") or {}
    settings.update({k: data_cfg[k] for k in DEFAULTS if data_cfg.get(k) is not None})
    if not settings["filename_template"] and data_cfg.get("preset"):
        from aia_jax.data import presets

        preset = presets.PRESETS.get(data_cfg["preset"])
        settings["filename_template"] = preset.filename_template if preset else ""
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("resize") is not None:
        # A short-side rule from the workdir would win over the H,W asked for (resized_shape).
        settings["resize_short_side"] = 0
    settings["resize"] = tuple(int(x) for x in settings["resize"])
    return settings


def read_class_names(path: str) -> list[str]:
    """One class name per line (blank lines skipped)."""
    if not os.path.isfile(path):
        raise InputNotFoundError(f"{path}: class-names file not found")
    with open(path, encoding="utf-8-sig") as f:  # a BOM (Windows editors) is no part of a name
        return [line.strip() for line in f if line.strip()]


def read_classnames_flag(path: str, checkpoint: str) -> list[str]:
    """`--classnames FILE`, checked against the class count in the checkpoint's `model.json`.

    Checked here, before the model is loaded or a frame decoded, so that the error names the
    flag and the file (`checked_class_names` only sees the names).
    """
    from aia_jax import modelio

    names = read_class_names(path)
    num_classes = modelio.read_meta(checkpoint).get("num_classes")
    # Anything but an int is left to the model's own check (`modelio.check_variables`).
    if isinstance(num_classes, int) and len(names) != num_classes:
        raise UserError(
            f"--classnames {path}: {len(names)} class names (non-blank lines) for a "
            f"{num_classes}-class model ({checkpoint})"
        )
    return names


def find_class_names(checkpoint: str, meta: Mapping[str, Any]) -> list[str] | None:
    """The class names a checkpoint records, or None.

    Looked up in `model.json` (`class_names`: a list; `classnames`: a file), then in the data
    config of a workdir's `config.json` through `aia_jax.data.class_names` (preset name files,
    the synthetic dataset's names, a `classnames` file; skipped when the dataset is not here).
    """
    names = meta.get("class_names")
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    if isinstance(meta.get("classnames"), str) and os.path.isfile(meta["classnames"]):
        return read_class_names(meta["classnames"])
    data_cfg = (_training_config(checkpoint) or {}).get("data")
    if not data_cfg:
        return None
    import ml_collections

    from aia_jax import data

    try:
        names = data.class_names(ml_collections.ConfigDict(data_cfg))
    except (data.DataError, OSError, KeyError, ValueError):
        return None
    return names if names != [str(i) for i in range(len(names))] else None


def checked_class_names(
    checkpoint: str,
    meta: Mapping[str, Any],
    num_classes: int,
    given: Sequence[str] | None = None,
) -> list[str] | None:
    """`given` names (e.g. `--classnames`), else `find_class_names`; one per class, or None."""
    names = find_class_names(checkpoint, meta) if given is None else list(given)
    if names is not None and len(names) != num_classes:
        raise UserError(f"{len(names)} class names for a {num_classes}-class model")
    return names


# ---------------------------------------------------------------------------------------------
# Reading the clip.


def _natural_key(name: str) -> list[Any]:
    """`img_2.jpg` before `img_10.jpg`: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _name_pattern(name: str) -> str | None:
    """`img_*.jpg` for `img_00001.jpg`: the name with its last digit run starred (None: none)."""
    pattern, count = re.subn(r"\d+(?=\D*$)", "*", name)
    return pattern if count else None


def _matches(name: str, template: str) -> bool:
    """Whether `name` is `template.format(n)` for the number in it (`img_{:05d}.jpg`)."""
    match = re.search(r"(\d+)(?=\D*$)", name)
    try:
        return match is not None and template.format(int(match.group(1))) == name
    except (IndexError, KeyError, ValueError):
        return False


def list_frames(folder: str, filename_template: str = "") -> list[str]:
    """The image files of a frame folder in natural sort order.

    A folder with frames of several name patterns (TSN/mmaction rawframes keep `img_*.jpg`
    beside the optical flow's `flow_x_*.jpg` and `flow_y_*.jpg`) would mix them into one clip:
    there only the files matching `filename_template` (e.g. 'img_{:05d}.jpg') are read, and
    without one it is refused.
    """
    files = [f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise InputNotFoundError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    patterns = sorted({p for p in map(_name_pattern, files) if p is not None})
    if len(patterns) > 1:
        if not filename_template:
            raise UserError(
                f"{folder}: holds frames of several name patterns ({', '.join(patterns)}); "
                "choose one with --filename-template, e.g. --filename-template 'img_{:05d}.jpg'"
            )
        files = [f for f in files if _matches(f, filename_template)]
        if not files:
            raise InputNotFoundError(
                f"{folder}: no frame file matches the filename template {filename_template!r} "
                f"(name patterns found: {', '.join(patterns)})"
            )
    return [os.path.join(folder, f) for f in sorted(files, key=_natural_key)]


def frame_indices(num_frames: int, num_segments: int, settings: Mapping[str, Any]) -> np.ndarray:
    """`[T]` frame indices of the validation clip (segment centres for TSN sampling)."""
    from aia_jax.data import sampling

    return sampling.eval_indices(
        num_frames,
        sampling=settings["sampling"],
        test_clips="single",
        num_segments=num_segments,
        clip_len=settings["clip_len"] or num_segments,
        frame_interval=settings["frame_interval"],
    )[0]


def clip_span(num_segments: int, settings: Mapping[str, Any]) -> int:
    """Fewest frames whose validation clip (`frame_indices`) does not wrap around.

    T segment centres need T frames; a dense clip of `clip_len` frames `frame_interval` apart
    spans `(clip_len - 1) * frame_interval + 1` (fewer frames loop back to the first ones).
    """
    if settings["sampling"] != "dense3d":
        return int(num_segments)
    clip_len = int(settings["clip_len"] or num_segments)
    return (clip_len - 1) * int(settings["frame_interval"]) + 1


def read_clip(path: str, num_segments: int, settings: Mapping[str, Any]) -> np.ndarray:
    """uint8 `[1, T, S, S, 3]`: the sampled, resized, centre-cropped clip of a video or folder."""
    from aia_jax.data import decode, transforms

    geometry = eval_geometry(settings)  # checked before any decoding
    pick = functools.partial(frame_indices, num_segments=num_segments, settings=settings)
    if os.path.isdir(path):
        files = list_frames(path, settings.get("filename_template", ""))
        indices = pick(len(files))
        frames = {int(i): decode.read_image(files[int(i)]) for i in np.unique(indices)}
        clip = decode.gather(indices, frames)
    elif os.path.isfile(path):
        clip = decode.read_video(path, pick)
    elif "://" in path or os.path.exists(path):
        # A URL or a device (/dev/video0) exists but is no file: "no such file" would mislead.
        raise UserError(
            f"{path}: not a video file or frame folder; cameras, devices and URLs are read as "
            "a stream: add --stream (and --input-format v4l2 for a Linux camera)"
        )
    else:
        raise InputNotFoundError(f"{path}: no such video file or frame folder")
    return transforms.eval_clips(clip[None], geometry)


def eval_geometry(settings: Mapping[str, Any]) -> Any:
    """The `transforms.Geometry` of `preprocessing_settings`: resize, one centre crop."""
    from aia_jax.data import transforms

    resize, short_side = tuple(settings["resize"]), int(settings["resize_short_side"])
    crop_size = int(settings["crop_size"])
    short = short_side or min(resize)
    if crop_size > short:
        # A box outside the frame would be cut short by numpy's slicing, not refused.
        how = (
            f"short side resized to {short_side}"
            if short_side
            else f"resize {resize[0]},{resize[1]}"
        )
        raise UserError(
            f"crop size {crop_size} is larger than the resized frames' short side {short} "
            f"({how}): give a --crop-size of at most {short} or a larger --resize"
        )
    return transforms.Geometry(
        resize=resize, resize_short_side=short_side, crop_size=crop_size, test_crops=1
    )


# ---------------------------------------------------------------------------------------------
# Prediction.


def predict_clip(
    model: Any, variables: Mapping[str, Any], clip: np.ndarray, dtype: Any = None
) -> np.ndarray:
    """float32 `[b, K]` logits of uint8 clips `[b, T, S, S, 3]`."""
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype or jnp.float32)
    return np.asarray(_jitted_logits()(model, dtype.name, variables, clip), np.float32)


@functools.cache
def _jitted_logits():
    """One jitted function for every call (models are hashable: compiled once per network)."""
    import jax

    from aia_jax import data

    def logits(model, dtype, variables, clip):
        return model.apply(variables, data.normalize(clip, dtype), train=False)

    return jax.jit(logits, static_argnums=(0, 1))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def top_classes(
    logits: np.ndarray, class_names: Sequence[str] | None, top: int = 5
) -> list[dict[str, Any]]:
    """The `top` classes of one video's logits `[K]`: index, name, probability, logit."""
    top = checked_positive_int("top", top)
    probs = softmax(np.asarray(logits, np.float64))
    order = np.argsort(-probs, kind="stable")[: min(top, len(probs))]
    names = list(class_names or [])
    return [
        {
            "class": int(k),
            "name": names[k] if k < len(names) else str(int(k)),
            "probability": float(probs[k]),
            "logit": float(logits[k]),
        }
        for k in order
    ]


def predict(
    checkpoint: str,
    video: str,
    *,
    class_names: Sequence[str] | None = None,
    top: int = 5,
    resize: Sequence[int] | None = None,
    crop_size: int | None = None,
    filename_template: str | None = None,
) -> dict[str, Any]:
    """Top classes of one video file or frame folder under a model directory or workdir.

    `filename_template` (default: the workdir config's) picks the frames of a folder holding
    several kinds of image files (see `list_frames`).

    Returns:
      `{'video', 'checkpoint', 'num_segments', 'settings', 'logits' [K], 'top': [...]}` with the
      `top` entries as in `top_classes`.
    """
    from aia_jax import modelio

    top = checked_positive_int("top", top)  # before the checkpoint is loaded or a frame decoded
    variables, meta = modelio.load_model(checkpoint)
    model = modelio.create_model(meta)
    settings = preprocessing_settings(
        checkpoint, resize=resize, crop_size=crop_size, filename_template=filename_template
    )
    class_names = checked_class_names(checkpoint, meta, model.num_classes, class_names)
    clip = read_clip(video, model.num_segments, settings)
    logits = predict_clip(model, variables, clip)[0]
    return {
        "video": video,
        "checkpoint": checkpoint,
        "num_segments": model.num_segments,
        "settings": settings,
        "logits": logits,
        "top": top_classes(logits, class_names, top),
    }


def format_prediction(result: Mapping[str, Any]) -> str:
    s = result["settings"]
    if s["sampling"] == "dense3d":
        frames = f"{s['clip_len'] or result['num_segments']} frames {s['frame_interval']} apart"
    else:
        frames = f"{result['num_segments']} frames (segment centres)"
    lines = [f"{result['video']}: {frames}, centre crop {s['crop_size']}x{s['crop_size']}"]
    width = max(len(t["name"]) for t in result["top"])
    for rank, t in enumerate(result["top"], start=1):
        name, prob = f"{t['name']:<{width}}", f"{t['probability']:.4f}"
        lines.append(f"  {rank}. {name}  {prob}  (class {t['class']})")
    return "\n".join(lines)


def _height_width(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected H,W (two positive integers)")
    return int(parts[0]), int(parts[1])


def _input_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. framerate=30")
    return key, value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m aia_jax.predict",
        description="Top-k classes of one video file or frame folder, or of a live stream "
        "over a sliding window (--stream).",
    )
    parser.add_argument(
        "video",
        help="video file (mp4, webm, …) or folder of frame images; with --stream, what FFmpeg "
        "opens: a file, a URL, or a device (/dev/video0 with --input-format v4l2)",
    )
    parser.add_argument("--checkpoint", required=True, help="model directory or training workdir")
    parser.add_argument("--classnames", default=None, help="file with one class name per line")
    parser.add_argument("--top", type=positive_int, default=5, help="how many classes to print")
    parser.add_argument(
        "--resize", type=_height_width, default=None, help="H,W every frame is resized to first"
    )
    parser.add_argument("--crop-size", type=positive_int, default=None, help="centre crop side")
    parser.add_argument(
        "--filename-template",
        default=None,
        help="frame files to read from a folder holding several kinds, e.g. 'img_{:05d}.jpg' "
        "(default: the workdir config's)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    live = parser.add_argument_group("streams (--stream)")
    live.add_argument(
        "--stream", action="store_true", help="classify a stream over a sliding window"
    )
    live.add_argument(
        "--input-format",
        default=None,
        help="FFmpeg input format of a device: v4l2 (Linux), avfoundation (macOS), dshow",
    )
    live.add_argument(
        "--input-option",
        type=_input_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="FFmpeg input option, repeatable, e.g. --input-option video_size=640x480",
    )
    live.add_argument(
        "--window-seconds",
        type=_positive_float,
        # None, not 2: a --window-seconds 2 without --stream must be caught like any other.
        default=None,
        help="seconds of the stream each prediction sees (default 2)",
    )
    live.add_argument(
        "--every",
        type=positive_int,
        default=None,
        help="frames between predictions (default a quarter of the window)",
    )
    live.add_argument(
        "--realtime",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="predict the newest window, skipping those a slow network cannot keep up with "
        "(default: on for devices and URLs, off for files)",
    )
    args = parser.parse_args(argv)
    stream_only = ("input_format", "window_seconds", "every", "realtime")
    # Every stream-only flag defaults to None (or []): given at all, whatever its value, it is seen.
    if not args.stream and (
        args.input_option or any(getattr(args, k) is not None for k in stream_only)
    ):
        parser.error("--input-format, --input-option, --window-seconds, --every and "
                     "--realtime need --stream")  # fmt: skip
    if args.stream:
        return _main_stream(parser, args)
    with reported_as_usage_errors(parser.prog):
        names = read_classnames_flag(args.classnames, args.checkpoint) if args.classnames else None
        result = predict(
            args.checkpoint,
            args.video,
            class_names=names,
            top=args.top,
            resize=args.resize,
            crop_size=args.crop_size,
            filename_template=args.filename_template,
        )
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "logits"}, indent=2))
    else:
        print(format_prediction(result))
    return 0


def _main_stream(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from aia_jax import stream

    if args.filename_template is not None:
        parser.error("--filename-template reads frame folders, not streams")
    with reported_as_usage_errors(parser.prog):
        names = read_classnames_flag(args.classnames, args.checkpoint) if args.classnames else None
        results = stream.predict_stream(
            args.checkpoint,
            args.video,
            input_format=args.input_format,
            options=dict(args.input_option),
            window_seconds=STREAM_WINDOW_SECONDS
            if args.window_seconds is None
            else args.window_seconds,
            every=args.every,
            realtime=args.realtime,
            class_names=names,
            top=args.top,
            resize=args.resize,
            crop_size=args.crop_size,
        )
        try:
            for result in results:
                if args.json:
                    print(json.dumps({k: v for k, v in result.items() if k != "logits"}))
                else:
                    print(stream.format_stream_prediction(result))
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass  # Ctrl-C ends a live stream
    return 0


if __name__ == "__main__":
    # Only as a command: the flags are process-wide, so importing the module sets none.
    xla_cpu.apply_cpu_flags()
    from aia_jax import compilation_cache  # imports jax: not before the flags are set

    compilation_cache.use_default()
    sys.exit(main())
