"""The data config: defaults, preset resolution, and what it says about classes and sources."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from importlib import resources
from typing import Any

import ml_collections
from ml_collections import config_dict

from aia_jax.data import presets, sources
from aia_jax.data.errors import DataError
from aia_jax.errors import unknown_field

SOURCES = ("synthetic", "frames", "videos", "tfds")
SPLITS = ("train", "val", "test")


def get_config() -> ml_collections.ConfigDict:
    """The data defaults (the release's numbers); '' / 0 / None fields are filled by `resolve`."""
    c = ml_collections.ConfigDict()
    c.source = "synthetic"  # 'synthetic' | 'frames' | 'videos' | 'tfds'
    c.preset = ""  # see presets.PRESETS; 'synthetic' is implied by source='synthetic'
    c.root = ""  # the dataset's root; relative list and media paths hang off it
    c.media_dir = ""  # folder under root that list entries are relative to ('' = root)
    c.train_list = ""  # frames: `dir num_frames label` lines; videos: `file label` lines or a
    c.val_list = ""  #   folder with one sub-folder per class
    c.test_list = ""  # '' = val_list
    c.filename_template = ""  # frame files: '{:05d}.jpg', 'img_{:05d}.jpg', …
    c.first_frame = 1  # number of a folder's first frame file: 1 (the release's lists) or 0
    c.tfds_name = ""  # e.g. 'ucf101/ucf101_1_256:2.0.0'
    c.data_dir = ""  # TFDS data_dir ('' = TFDS's default); also where 'synthetic' is written
    c.train_split = "train"
    c.val_split = "validation"
    c.test_split = "test"
    c.tfds_video_key = "video"
    c.tfds_label_key = "label"
    c.num_classes = 0  # 0 = from the preset or the dataset
    c.num_segments = 8  # T: frames per clip
    c.sampling = "tsn"  # 'tsn' (segments) | 'dense3d' (clip_len frames frame_interval apart)
    c.clip_len = 0  # dense3d frames per clip; 0 = num_segments
    c.frame_interval = 8
    c.test_clips = "single"  # 'single' | 'twice' (tsn: centres + starts) | 'dense' (10 clips)
    c.test_crops = 1  # 1 (centre) | 3 (full-res, short side) | 5 | 10 (5 and their mirrors)
    c.resize = (240, 320)  # (h, w) every frame is resized to first
    c.resize_short_side = 0  # > 0: resize the short side to this instead, keeping the aspect
    c.crop_size = 224
    c.scales = (1.0, 0.875, 0.75, 0.66)  # multi-scale crop sizes, fractions of the short side
    c.flip = True  # random horizontal flip in training (labels through flip_map)
    # Label pairs a horizontal flip swaps, ((86, 87), …); None = the preset's, () = none. A
    # typed placeholder, so `--config.data.flip_map='((86, 87),)'` overrides it; for the same
    # reason a dict is refused here: give its pairs, `tuple(d.items())`.
    c.flip_map = config_dict.placeholder(tuple)
    c.num_workers = 2  # worker processes; 0 = read in this process
    c.prefetch_buffer = 2  # host batches read ahead
    c.read_threads = 2  # threads per reading process
    c.on_bad_sample = "raise"  # 'raise' | 'skip' (warn, count; see bad_sample_count())
    c.classnames = ""  # a file with one class name per line; '' = the preset's or numbers
    c.synthetic_num_train = 2400
    c.synthetic_num_val = 480
    c.synthetic_seed = 0
    return c


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A checked copy with the preset's values in the fields left '' / 0 / None.

    A named preset also gives its source where `source` is left at the default 'synthetic'.
    """
    c = ml_collections.ConfigDict(config.to_dict())
    # A config file's misspelt field would otherwise be ignored (the command line rejects it).
    unknown = unknown_field(c, get_config(), "data.")
    if unknown:
        raise DataError(unknown)
    if c.source not in SOURCES:
        raise DataError(f"config.data.source {c.source!r}: expected one of {SOURCES}")
    fill_from_preset(c)
    if not c.filename_template:
        c.filename_template = "{:05d}.jpg"
    if c.flip_map is None:
        c.flip_map = []
    if c.source == "synthetic":
        from aia_jax.data import synthetic  # noqa: PLC0415

        c.num_classes = c.num_classes or synthetic.NUM_CLASSES
    _check(c)
    return c


_PRESET_FIELDS = (
    "media_dir",
    "train_list",
    "val_list",
    "test_list",
    "filename_template",
    "num_classes",
)


def fill_from_preset(c: Any) -> None:
    """Fills the fields of data config `c` (a ConfigDict or dict) left '' / 0 / None from its
    preset, in place; a named preset also gives its source where `source` is left at the
    default 'synthetic'. Fields `c` lacks are left out (an older run's recorded config)."""
    preset_name = c.get("preset") or ("synthetic" if c.get("source") == "synthetic" else "")
    if not preset_name:
        return
    p = presets.get(preset_name)
    # source 'synthetic' is the default, so a named dataset preset means its own source.
    if c.get("source", "synthetic") == "synthetic":
        c["source"] = p.source
    for field in _PRESET_FIELDS:
        if field in c and not c[field]:
            c[field] = getattr(p, field)
    if "flip_map" in c and c["flip_map"] is None:
        c["flip_map"] = [list(pair) for pair in p.flip_pairs]


def _check(c: ml_collections.ConfigDict) -> None:
    choices = {
        "sampling": ("tsn", "dense3d"),
        "test_clips": ("single", "twice", "dense"),
        "test_crops": (1, 3, 5, 10),
        "on_bad_sample": ("raise", "skip"),
    }
    for field, allowed in choices.items():
        if c[field] not in allowed:
            raise DataError(f"config.data.{field} {c[field]!r}: expected one of {allowed}")
    if c.num_segments <= 0 or c.crop_size <= 0:
        raise DataError("config.data.num_segments and config.data.crop_size must be positive")
    if c.get("first_frame", 1) not in (0, 1):
        raise DataError(f"config.data.first_frame {c.first_frame!r}: expected 0 or 1")
    resize = tuple(c.resize) if isinstance(c.resize, (list, tuple)) else ()
    if len(resize) != 2 or not all(isinstance(v, int) and v > 0 for v in resize):
        raise DataError(f"config.data.resize {c.resize!r}: expected (height, width), positive ints")
    short = c.resize_short_side if c.resize_short_side else min(resize)
    if isinstance(short, int) and c.crop_size > short:
        raise DataError(
            f"config.data.crop_size {c.crop_size} is larger than the resized frames' short side "
            f"{short} (config.data.resize {tuple(resize)}, resize_short_side "
            f"{c.resize_short_side}): validation crops would not fit"
        )
    scales = tuple(c.scales) if isinstance(c.scales, (list, tuple)) else ()
    if not scales or not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in scales):
        raise DataError(f"config.data.scales {c.scales!r}: expected fractions in (0, 1]")
    for field, low in (
        ("frame_interval", 1),
        ("clip_len", 0),
        ("resize_short_side", 0),
        ("num_workers", 0),
        ("prefetch_buffer", 1),
        ("read_threads", 1),
    ):
        if not isinstance(c[field], int) or c[field] < low:
            raise DataError(f"config.data.{field} {c[field]!r}: expected an int >= {low}")
    if c.source == "frames":
        try:
            name = c.filename_template.format(1)
        except (IndexError, KeyError, ValueError) as e:
            name = f"({type(e).__name__}: {e})"
        if name == c.filename_template or name.startswith("("):
            raise DataError(
                f"config.data.filename_template {c.filename_template!r}: expected one field for "
                f"the frame number, like 'img_{{:05d}}.jpg' {name if name.startswith('(') else ''}"
            )
    if c.source in ("frames", "videos") and c.root and not os.path.isdir(c.root):
        raise DataError(f"config.data.root {c.root}: not a directory")
    if c.source == "tfds" and not c.tfds_name:
        raise DataError("config.data.tfds_name is empty (source 'tfds')")


def clip_length(c: ml_collections.ConfigDict) -> int:
    """Frames per clip: num_segments (tsn) or clip_len (dense3d; 0 = num_segments)."""
    return c.num_segments if c.sampling == "tsn" else (c.clip_len or c.num_segments)


# ---------------------------------------------------------------------------------------------
# Sources.


def _path(c: ml_collections.ConfigDict, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(c.root, path)


def list_path(c: ml_collections.ConfigDict, split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {SPLITS}")
    path = {"train": c.train_list, "val": c.val_list, "test": c.test_list or c.val_list}[split]
    if not path:
        raise DataError(f"config.data.{split}_list is empty (source {c.source!r})")
    return _path(c, path)


def describe_split(config: ml_collections.ConfigDict, split: str) -> str:
    """Where `split`'s videos come from, in words: the list file, folder or TFDS split."""
    c = resolve(config)
    if c.source == "synthetic":
        return f"the synthetic dataset's {'train' if split == 'train' else 'validation'!r} split"
    if c.source == "tfds":
        tfds_split = {"train": c.train_split, "val": c.val_split, "test": c.test_split}[split]
        return f"TFDS {c.tfds_name} split {tfds_split!r}"
    text = list_path(c, split)
    if split == "test" and not c.test_list:
        text += " (config.data.test_list is empty: the val list)"
    return text


def make_source(config: ml_collections.ConfigDict, split: str) -> sources.Source:
    """The checked source of `split` ('train' | 'val' | 'test') of a config (resolved here)."""
    c = resolve(config)
    key = json.dumps(c.to_dict(), sort_keys=True, default=str)
    # The list's modification time is part of the key: an edited list is read again.
    mtime = 0.0
    if c.source in ("frames", "videos"):
        with contextlib.suppress(DataError, OSError):
            mtime = os.path.getmtime(list_path(c, split))
    return _cached_source(key, split, mtime)


@functools.lru_cache(maxsize=16)
def _cached_source(config_json: str, split: str, mtime: float) -> sources.Source:
    del mtime  # part of the cache key only
    c = ml_collections.ConfigDict(json.loads(config_json))
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {SPLITS}")
    if c.source == "synthetic":
        from aia_jax.data import synthetic  # noqa: PLC0415

        name = synthetic.prepare(
            c.data_dir or None, c.synthetic_num_train, c.synthetic_num_val, c.synthetic_seed
        )
        tfds_split = "train" if split == "train" else "validation"
        return sources.TfdsSource(name, tfds_split, c.data_dir or None)
    if c.source == "tfds":
        tfds_split = {"train": c.train_split, "val": c.val_split, "test": c.test_split}[split]
        return sources.TfdsSource(
            c.tfds_name, tfds_split, c.data_dir or None, c.tfds_video_key, c.tfds_label_key
        )
    media_root = _path(c, c.media_dir) if c.media_dir else c.root
    path = list_path(c, split)
    if c.source == "frames":
        entries = sources.parse_frame_list(path, media_root, c.num_classes)
        first = int(c.get("first_frame", 1))
        sources.check_frame_numbering(entries, media_root, c.filename_template, first)
        return sources.FrameFolderSource(entries, media_root, c.filename_template, first)
    if os.path.isdir(path):
        # Labels are positions in the training split's class list, whatever this split holds.
        train_path = list_path(c, "train")
        classes = None
        if split != "train" and os.path.isdir(train_path):
            classes = sources.class_folder_names(train_path)
        entries, _ = sources.scan_class_folders(path, classes)
        _check_folder_labels(entries, c.num_classes, path)
        return sources.VideoFileSource(entries, path)
    return sources.VideoFileSource(
        sources.parse_video_list(path, media_root, c.num_classes), media_root
    )


def _check_folder_labels(entries: list[sources.Entry], num_classes: int, folder: str) -> None:
    found = max(e.label for e in entries) + 1
    if num_classes and found > num_classes:
        raise DataError(f"{folder}: {found} class folders but num_classes is {num_classes}")


# ---------------------------------------------------------------------------------------------
# Classes.


def num_classes(config: ml_collections.ConfigDict) -> int:
    """Number of classes: the config's, the preset's, or the dataset's own."""
    c = resolve(config)
    if c.num_classes:
        return int(c.num_classes)
    if c.source == "tfds":
        n = make_source(c, "train").num_classes
        if n:
            return n
    if c.source == "videos" and os.path.isdir(list_path(c, "train")):
        return len(sources.class_folder_names(list_path(c, "train")))
    raise DataError(f"config.data.num_classes is 0 and source {c.source!r} does not say: set it")


def class_names(config: ml_collections.ConfigDict) -> list[str]:
    """One name per class: the `classnames` file, the preset's, the dataset's, or numbers."""
    c = resolve(config)
    n = num_classes(c)
    names: list[str] = []
    where = ""
    if c.classnames:
        where = c.classnames
        if not os.path.isfile(where):
            raise DataError(f"config.data.classnames {where}: file not found")
        with open(where, encoding="utf-8-sig") as f:  # a BOM is no part of the first name
            names = [line.strip() for line in f if line.strip()]
    elif c.source == "synthetic":
        from aia_jax.data import synthetic  # noqa: PLC0415

        names = list(synthetic.CLASS_NAMES)
    elif c.preset and presets.get(c.preset).classnames:
        where = presets.get(c.preset).classnames
        text = resources.files("aia_jax.data").joinpath("classnames", where).read_text("utf-8")
        names = [line.strip() for line in text.splitlines() if line.strip()]
    elif c.source == "tfds":
        names = list(make_source(c, "train").class_names)
    elif c.source == "videos" and os.path.isdir(list_path(c, "train")):
        names = sources.class_folder_names(list_path(c, "train"))
    if not names:
        return [str(i) for i in range(n)]
    if len(names) != n:
        raise DataError(f"{where or c.source}: {len(names)} class names for {n} classes")
    return names


def flip_lookup(c: ml_collections.ConfigDict) -> Any:
    """`table[label]` after a horizontal flip (numpy int32 `[num_classes]`)."""
    from aia_jax.data import transforms  # noqa: PLC0415

    flip_map = c.flip_map
    if hasattr(flip_map, "to_dict"):
        flip_map = flip_map.to_dict()
    n = num_classes(c)  # its own error names config.data.num_classes
    try:
        return transforms.flip_table(flip_map, n)
    except ValueError as e:
        raise DataError(f"config.data.flip_map: {e}") from None
