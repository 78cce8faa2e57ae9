"""Where videos come from: frame folders or video files named by a list, and TFDS datasets.

A source is a picklable random-access collection: `len(source)`, `source.describe(i)` (a short
"where" for messages) and `source.read(i, pick) -> (frames, label)` with
`pick(num_frames) -> indices` choosing the frames once the video's length is known. List files
are checked when the source is made; a problem there is a `DataError` naming file and line.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import io
import json
import os
import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from aia_jax.data import decode
from aia_jax.data.errors import BadSampleError, DataError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov")


class Source(Protocol):
    def __len__(self) -> int: ...

    def describe(self, index: int) -> str: ...

    def read(self, index: int, pick: decode.Pick) -> tuple[np.ndarray, int]: ...


@dataclasses.dataclass(frozen=True)
class Entry:
    """One line of a list: a frame folder or video file, its frame count (0: unknown), label."""

    path: str
    num_frames: int
    label: int
    where: str  # "list_file:line", or the folder it was found in


# ---------------------------------------------------------------------------------------------
# List files.


def _read_lines(list_path: str) -> list[tuple[int, str]]:
    if not os.path.isfile(list_path):
        raise DataError(f"{list_path}: list file not found")
    with open(list_path, "rb") as f:
        text = f.read()
    # Windows editors start UTF-8 files with a byte-order mark; it is not part of the first path.
    raw = text.removeprefix(codecs.BOM_UTF8).splitlines()
    lines = []
    for n, data in enumerate(raw, start=1):
        try:
            line = data.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            message = f"{list_path}:{n}: not UTF-8 text ({e.reason} at byte {e.start})"
            raise DataError(message) from None
        if line:
            lines.append((n, line))
    if not lines:
        raise DataError(f"{list_path}: the list is empty")
    return lines


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _check_label(label: int, num_classes: int, where: str) -> None:
    if num_classes > 0 and not 0 <= label < num_classes:
        raise DataError(f"{where}: label {label} is outside [0, {num_classes})")


def parse_frame_list(
    list_path: str, media_root: str, num_classes: int, check_paths: bool = True
) -> list[Entry]:
    """Lines `relative/dir num_frames label` (the dir may hold spaces), dirs under `media_root`."""
    entries = []
    for n, line in _read_lines(list_path):
        where = f"{list_path}:{n}"
        parts = line.rsplit(maxsplit=2)
        num_frames = _int(parts[1]) if len(parts) == 3 else None
        label = _int(parts[2]) if len(parts) == 3 else None
        if num_frames is None or label is None:
            raise DataError(f"{where}: expected 'relative/dir num_frames label', got {line!r}")
        if num_frames <= 0:
            raise DataError(
                f"{where}: num_frames must be positive, got {num_frames} (read as dir "
                f"{parts[0]!r}, num_frames {parts[1]}, label {parts[2]}: the last two fields)"
            )
        _check_label(label, num_classes, where)
        if check_paths and not os.path.isdir(os.path.join(media_root, parts[0])):
            raise DataError(f"{where}: frame folder {os.path.join(media_root, parts[0])} not found")
        entries.append(Entry(parts[0], num_frames, label, where))
    return entries


def check_frame_numbering(
    entries: Sequence[Entry], media_root: str, template: str, first_frame: int, count: int = 4
) -> None:
    """Checks that some of the first `count` folders hold their first and last listed frames.

    Folders numbered from 0 where the list counts from 1 (or the other way round), or a wrong
    `filename_template`, would otherwise fail only when a clip happens to sample such a frame.
    Only a failure of every folder checked is an error: one broken folder is a bad sample, for
    `on_bad_sample` to handle when it is read.
    """

    def exists(folder: str, n: int) -> bool:
        return os.path.isfile(os.path.join(folder, template.format(n)))

    problems = []
    for entry in entries[:count]:
        folder = os.path.join(media_root, entry.path)
        last = first_frame + entry.num_frames - 1
        missing = [n for n in (first_frame, last) if not exists(folder, n)]
        if not missing:
            return
        problems.append((entry, folder, missing[0]))
    if not problems:
        return
    entry, folder, number = problems[0]
    other = 1 - first_frame
    hint = ""
    # A file 0 means 0-based numbering; a missing first file 0 beside a file 1, 1-based.
    zero_based = first_frame == 1 and exists(folder, 0)
    one_based = number == first_frame == 0 and exists(folder, 1)
    if zero_based or one_based:
        hint = (
            f"; {template.format(other)} is there: the frames are numbered from {other}, "
            f"set config.data.first_frame={other}"
        )
    raise DataError(
        f"{entry.where}: frame folder {folder} has no {template.format(number)} (frame "
        f"{number - first_frame + 1} of {entry.num_frames}, by config.data.filename_template "
        f"{template!r} and config.data.first_frame {first_frame}; nor have the next "
        f"{len(problems) - 1} folders checked){hint}"
    )


def parse_video_list(
    list_path: str, media_root: str, num_classes: int, check_paths: bool = True
) -> list[Entry]:
    """Lines `relative/file label` (the path may contain spaces), files under `media_root`."""
    entries = []
    for n, line in _read_lines(list_path):
        where = f"{list_path}:{n}"
        parts = line.rsplit(maxsplit=1)
        label = _int(parts[1]) if len(parts) == 2 else None
        if label is None:
            raise DataError(f"{where}: expected 'relative/file label', got {line!r}")
        _check_label(label, num_classes, where)
        if check_paths and not os.path.isfile(os.path.join(media_root, parts[0])):
            raise DataError(f"{where}: video {os.path.join(media_root, parts[0])} not found")
        entries.append(Entry(parts[0], 0, label, where))
    return entries


def class_folder_names(folder: str) -> list[str]:
    """The sorted sub-folder names of a class-folder split (its classes, labels 0, 1, …).

    Hidden folders (`.ipynb_checkpoints`, …) and Synology's `@eaDir` are not classes: sorted
    first, they would shift every label.
    """
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: video folder not found")
    return sorted(
        d
        for d in os.listdir(folder)
        if not d.startswith(".") and d != "@eaDir" and os.path.isdir(os.path.join(folder, d))
    )


def scan_class_folders(
    folder: str, classes: Sequence[str] | None = None
) -> tuple[list[Entry], list[str]]:
    """One sub-folder per class, video files inside each.

    Args:
      folder: the split's folder.
      classes: the class names whose positions are the labels (the training split's, so that
        a validation folder lacking a class keeps the others' labels); None: this folder's
        sorted sub-folder names.

    Raises:
      DataError: the folder is missing, holds no videos, or a sub-folder is not in `classes`.
    """
    found = class_folder_names(folder)
    classes = found if classes is None else list(classes)
    label_of = {name: label for label, name in enumerate(classes)}
    entries = []
    for name in found:
        if name not in label_of:
            raise DataError(
                f"{os.path.join(folder, name)}: class folder not among the training split's "
                f"{len(classes)} classes"
            )
        for file in sorted(os.listdir(os.path.join(folder, name))):
            if file.lower().endswith(VIDEO_EXTENSIONS):
                entries.append(Entry(os.path.join(name, file), 0, label_of[name], folder))
    if not entries:
        raise DataError(
            f"{folder}: no video files ({', '.join(VIDEO_EXTENSIONS)}) in class folders"
        )
    return entries, classes


# ---------------------------------------------------------------------------------------------
# Sources.


@dataclasses.dataclass
class FrameFolderSource:
    """Frame folders of image files named by `template` (e.g. `img_{:05d}.jpg`).

    Frame files are numbered from `first_frame` (1 in the release's lists).
    """

    entries: Sequence[Entry]
    media_root: str
    template: str
    first_frame: int = 1

    def __len__(self) -> int:
        return len(self.entries)

    def describe(self, index: int) -> str:
        entry = self.entries[index]
        return f"{entry.where} ({entry.path})"

    def read(self, index: int, pick: decode.Pick) -> tuple[np.ndarray, int]:
        entry = self.entries[index]
        folder = os.path.join(self.media_root, entry.path)
        frames = decode.read_frame_folder(
            folder, self.template, entry.num_frames, pick, self.first_frame
        )
        return frames, entry.label


@dataclasses.dataclass
class VideoFileSource:
    """Video files (mp4, webm, avi, …) decoded with PyAV."""

    entries: Sequence[Entry]
    media_root: str

    def __len__(self) -> int:
        return len(self.entries)

    def describe(self, index: int) -> str:
        entry = self.entries[index]
        return f"{entry.where} ({entry.path})"

    def read(self, index: int, pick: decode.Pick) -> tuple[np.ndarray, int]:
        entry = self.entries[index]
        return decode.read_video(os.path.join(self.media_root, entry.path), pick), entry.label


class TfdsSource:
    """A prepared TFDS dataset read through `tfds.data_source` (ArrayRecord; no TensorFlow).

    The video feature is a `uint8 [N, H, W, C]` tensor (C: 1 grey, 3 RGB or 4 RGBA; read as RGB),
    or a `Video` feature of encoded frames; another dtype is a bad sample. `split` is a TFDS split
    spec ('train', 'train[:80%]', 'train[:50%]+validation[:2]'), read with TFDS's semantics.
    TFDS needs TensorFlow to build `Video` features; without it this reads the prepared ArrayRecord
    files itself (`tf.train.Example` protos parsed with TFDS's own TF-free protos) and decodes only
    the picked frames.
    """

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None,
        video_key: str = "video",
        label_key: str = "label",
    ):
        self.name, self.split, self.data_dir = name, split, data_dir or None
        self.video_key, self.label_key = video_key, label_key
        self._reader: Any = None
        self.raw = False
        # Once, here (not in every reading worker): TFDS's own errors for a bad split spec lack
        # the split names, and a reversed slice ('train[5:2]') only fails later, as a negative
        # length. A dataset not found or unreadable here is left to `_open` to explain.
        prepared = None
        with contextlib.suppress(DataError, OSError, ValueError):
            prepared = _prepared_dataset(self.name, self.data_dir)
        if prepared is not None:
            _split_instructions(self.split, *prepared)
        self._length = len(self._open())
        self._check_keys()
        self.num_classes, self.class_names = self._label_info()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None  # reopened lazily in each worker process
        return state

    def _open(self) -> Any:
        if self._reader is not None:
            return self._reader
        import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy; only for TFDS sources)

        tfds.disable_progress_bar()
        if not self.raw:
            try:
                # TFDS prints a banner to stdout when a feature needs the absent TensorFlow.
                with contextlib.redirect_stdout(io.StringIO()):
                    self._reader = tfds.data_source(
                        self.name, split=self.split, data_dir=self.data_dir, download=False
                    )
                return self._reader
            except ModuleNotFoundError as e:
                if "tensorflow" not in str(e):
                    raise
                self.raw = True
            except (AssertionError, ValueError, KeyError, FileNotFoundError) as e:
                where = self.data_dir or "the default TFDS data_dir"
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise DataError(
                    f"tfds {self.name!r} split {self.split!r} in {where}: {msg}"
                ) from None
        self._reader = RawArrayRecordExamples(self.name, self.split, self.data_dir)
        return self._reader

    def _check_keys(self) -> None:
        # A wrong key would otherwise be a KeyError traceback, from a reading worker at that.
        if self.raw:
            keys = self._reader.feature_keys()
        else:
            keys = list(self._reader.dataset_info.features.keys())
        for field, key in (("tfds_video_key", self.video_key), ("tfds_label_key", self.label_key)):
            if keys and key not in keys:
                raise DataError(
                    f"config.data.{field} {key!r}: tfds {self.name!r} has no such feature "
                    f"(it has {', '.join(sorted(keys))})"
                )

    def _label_info(self) -> tuple[int, list[str]]:
        if self.raw:
            return self._reader.label_info(self.label_key)
        feature = self._reader.dataset_info.features[self.label_key]
        names = list(getattr(feature, "names", None) or [])
        return int(getattr(feature, "num_classes", 0) or 0), names

    def __len__(self) -> int:
        return self._length

    def describe(self, index: int) -> str:
        return f"tfds {self.name}[{self.split}] example {index}"

    def read(self, index: int, pick: decode.Pick) -> tuple[np.ndarray, int]:
        # Messages leave out `describe(index)`: the pipeline puts it in front of every bad sample.
        example = self._open()[index]
        video, label = example[self.video_key], int(example[self.label_key])
        if len(video) == 0:  # every sampling rule would index frame 0
            raise BadSampleError("the video has no frames")
        if isinstance(video, np.ndarray):
            _check_tensor_video(video, self.video_key)
            indices = np.asarray(pick(len(video)))
            return _to_rgb(video[indices]), label
        # Encoded frames (the raw reader): decode only the picked ones.
        indices = np.asarray(pick(len(video)))
        frames = {int(i): _decode_image_bytes(video[int(i)], int(i)) for i in np.unique(indices)}
        return decode.gather(indices, frames), label


def _check_tensor_video(video: np.ndarray, key: str) -> None:
    if video.ndim != 4 or video.shape[-1] not in (1, 3, 4):
        raise BadSampleError(
            f"feature {key!r} has shape {list(video.shape)} ({video.dtype}), expected "
            "[frames, height, width, channels] with 1 (grayscale), 3 (RGB) or 4 (RGBA) channels"
        )
    # Frames are 0–255 pixels from here on: float [0, 1] or 16-bit ones would be misread, or
    # fail deep in the resize with a traceback.
    if video.dtype != np.uint8:
        raise BadSampleError(
            f"feature {key!r} has shape {list(video.shape)} ({video.dtype}), expected uint8 "
            "[frames, height, width, channels]"
        )


def _to_rgb(frames: np.ndarray) -> np.ndarray:
    """`[..., C]` frames with C of 1, 3 or 4 as `[..., 3]`, as PIL's `convert('RGB')` makes them.

    The release reads every frame through `convert('RGB')`: grey becomes three equal channels and
    alpha is dropped (not composited).
    """
    if frames.shape[-1] == 1:
        return np.repeat(frames, 3, axis=-1)
    return frames[..., :3] if frames.shape[-1] == 4 else frames


def _decode_image_bytes(data: bytes, frame: int) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415

    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except decode.IMAGE_ERRORS as e:
        raise BadSampleError(f"cannot decode frame {frame}: {e}") from None


def _tfds_default_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), "tensorflow_datasets"
    )


class RawArrayRecordExamples:
    """A TFDS-prepared ArrayRecord split read without TFDS's feature classes.

    Each record is a serialized `tf.train.Example`; the video feature is a list of encoded frames
    (`bytes_list`) or a raw tensor, the label an int. `split` is a TFDS split spec, mapped onto
    the shard files with TFDS's own parser: the examples and order of `tfds.data_source`.
    """

    def __init__(self, name: str, split: str, data_dir: str | None):
        self.directory, info = _prepared_dataset(name, data_dir)
        file_format = info.get("fileFormat", "tfrecord")
        if file_format != "array_record":
            raise DataError(f"{self.directory}: file format {file_format!r}, need array_record")
        # `split` is a TFDS split spec ('train[:80%]+validation'): which records of which shard
        # files, in order, as `tfds.data_source` reads them.
        self.instructions = _split_instructions(split, self.directory, info)
        self.length = sum(i.take for i in self.instructions)
        self._source: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None}

    def __len__(self) -> int:
        return self.length

    def feature_keys(self) -> list[str]:
        """The top-level feature names: features.json's, else the first record's ([] if none)."""
        with contextlib.suppress(OSError, KeyError, ValueError, TypeError):
            with open(os.path.join(self.directory, "features.json")) as f:
                return list(json.load(f)["featuresDict"]["features"])
        return list(self[0]) if self.length else []

    def label_info(self, label_key: str) -> tuple[int, list[str]]:
        path = os.path.join(self.directory, "features.json")
        try:
            with open(path) as f:
                features = json.load(f)["featuresDict"]["features"]
            num_classes = int(features[label_key]["classLabel"]["numClasses"])
        except (OSError, KeyError, ValueError):
            return 0, []
        names_path = os.path.join(self.directory, f"{label_key}.labels.txt")
        names = []
        if os.path.isfile(names_path):
            with open(names_path) as f:
                names = [line.strip() for line in f if line.strip()]
        return num_classes, names

    def __getitem__(self, index: int) -> dict[str, Any]:
        from tensorflow_datasets.proto import tf_example_pb2  # noqa: PLC0415

        if self._source is None:
            from array_record.python import array_record_data_source  # noqa: PLC0415

            self._source = array_record_data_source.ArrayRecordDataSource(self.instructions)
        example = tf_example_pb2.Example.FromString(self._source[index])
        out = {}
        for key, feature in example.features.feature.items():
            kind = feature.WhichOneof("kind")
            if kind == "bytes_list":
                out[key] = list(feature.bytes_list.value)
            elif kind == "int64_list":
                values = list(feature.int64_list.value)
                out[key] = values[0] if len(values) == 1 else np.asarray(values)
            elif kind == "float_list":
                out[key] = np.asarray(feature.float_list.value)
        return out


def _prepared_dataset(name: str, data_dir: str | None) -> tuple[str, dict[str, Any]]:
    """The directory of TFDS dataset `name` ('ds[/config][:version]'; no version: the newest
    prepared) under `data_dir` and its parsed `dataset_info.json`."""
    base, _, version = name.partition(":")
    root = os.path.join(data_dir or _tfds_default_dir(), base)
    if not version:
        versions = sorted(
            (
                d
                for d in _listdir(root)
                if os.path.isfile(os.path.join(root, d, "dataset_info.json"))
            ),
            key=lambda v: tuple(_int(x) or 0 for x in v.split(".")),
        )
        if not versions:
            raise DataError(f"{root}: no prepared TFDS dataset {name!r}")
        version = versions[-1]
    directory = os.path.join(root, version)
    with open(os.path.join(directory, "dataset_info.json")) as f:
        return directory, json.load(f)


def _split_instructions(spec: str, directory: str, info: dict[str, Any]) -> list[Any]:
    """The `FileInstruction`s (shard file, skip, take) that read split spec `spec`.

    TFDS's own parser and slicing (no TensorFlow needed) make the examples, their order and the
    rounding of percent bounds those of `tfds.data_source`. A bad spec is a one-line `DataError`
    naming the spec and the dataset's splits.
    """
    from tensorflow_datasets.core import splits as tfds_splits  # noqa: PLC0415
    from tensorflow_datasets.core.utils import shard_utils  # noqa: PLC0415

    lengths = {
        s["name"]: [int(n) for n in s.get("shardLengths", [])] for s in info.get("splits", [])
    }
    infos = {
        name: tfds_splits.SplitInfo(name=name, shard_lengths=n, num_bytes=0)
        for name, n in lengths.items()
    }

    def refuse(reason: str) -> DataError:
        have = ", ".join(f"{name} ({sum(n)} examples)" for name, n in lengths.items()) or "none"
        return DataError(
            f"{directory}: split {spec!r}: {reason} (splits: {have}; syntax as in TFDS, "
            "e.g. 'train', 'train[:80%]', 'train[10:20]+validation')"
        )

    try:
        absolute = tfds_splits.AbstractSplit.from_spec(spec).to_absolute(infos)
    except (ValueError, NotImplementedError) as e:
        # TFDS puts the reason on the last line; its pointers (docs, issues), repeat of the spec
        # and list of split names are left out (the message has examples and the splits).
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        reason = re.sub(
            r"\.? ?(See format at:? \S+|Should be one of .*|Got: .*|Please open a github .*)$",
            "",
            reason,
        )
        raise refuse(reason.rstrip(".")) from None
    instructions = []
    for part in absolute:
        name, n = part.splitname, infos[part.splitname].num_examples
        start, stop = part.from_ or 0, n if part.to is None else part.to
        if start > stop:  # TFDS would make a negative length of this
            raise refuse(f"slice [{start}:{stop}] of {name!r} is reversed")
        if n:  # TFDS skips an empty split
            k = len(lengths[name])
            stem = os.path.join(directory, f"{info['name']}-{name}.array_record")
            paths = [f"{stem}-{i:05d}-of-{k:05d}" for i in range(k)]
            instructions += shard_utils.get_file_instructions(start, stop, paths, lengths[name])
    return instructions


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


__all__ = [
    "Entry",
    "FrameFolderSource",
    "RawArrayRecordExamples",
    "Source",
    "TfdsSource",
    "VideoFileSource",
    "parse_frame_list",
    "parse_video_list",
    "check_frame_numbering",
    "class_folder_names",
    "scan_class_folders",
]
