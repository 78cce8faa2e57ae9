"""Dataset presets: where a dataset's lists and frames sit under a user-given root, and its labels.

A preset holds paths relative to `config.root`, the frame-file template, the class count, the
label map of a horizontal flip and, where the class names are public and short, a names file
under `classnames/`. The layouts are this project's conventions (the lists in the release's
`relative/dir num_frames label` format); datasets laid out differently set the fields directly.
"""

from __future__ import annotations

import dataclasses

# Something-Something: "… from left to right" / "… from right to left" style pairs.
SOMETHING_FLIP = ((86, 87), (93, 94), (166, 167))


@dataclasses.dataclass(frozen=True)
class Preset:
    source: str = "frames"
    media_dir: str = ""  # folder under root that list entries are relative to
    train_list: str = ""
    val_list: str = ""
    test_list: str = ""
    filename_template: str = "{:05d}.jpg"
    num_classes: int = 0
    flip_pairs: tuple[tuple[int, int], ...] = ()
    classnames: str = ""  # a file in aia_jax/data/classnames/, or "" for numbers


def _splits(prefix: str, n: int, make) -> dict[str, Preset]:
    presets = {f"{prefix}_split{k}": make(k) for k in range(1, n + 1)}
    presets[prefix] = presets[f"{prefix}_split1"]
    return presets


PRESETS: dict[str, Preset] = {
    "synthetic": Preset(source="synthetic", num_classes=12, flip_pairs=((0, 1), (8, 9))),
    "something_v1": Preset(
        media_dir="20bn-something-something-v1",
        train_list="train_videofolder.txt",
        val_list="val_videofolder.txt",
        filename_template="{:05d}.jpg",
        num_classes=174,
        flip_pairs=SOMETHING_FLIP,
    ),
    "something_v2": Preset(
        media_dir="20bn-something-something-v2-frames",
        train_list="train_videofolder.txt",
        val_list="val_videofolder.txt",
        filename_template="{:06d}.jpg",
        num_classes=174,
        flip_pairs=SOMETHING_FLIP,
    ),
    "diving48": Preset(
        media_dir="frames",
        train_list="train_videofolder.txt",
        val_list="val_videofolder.txt",
        filename_template="{:05d}.jpg",
        num_classes=48,
    ),
    **_splits(
        "egtea",
        3,
        lambda k: Preset(
            media_dir="frames",
            train_list=f"train_split{k}.txt",
            val_list=f"test_split{k}.txt",
            filename_template="{:05d}.jpg",
            num_classes=106,
        ),
    ),
    **_splits(
        "ucf101",
        3,
        lambda k: Preset(
            media_dir="jpg",
            train_list=f"file_list/ucf101_rgb_train_split_{k}.txt",
            val_list=f"file_list/ucf101_rgb_val_split_{k}.txt",
            filename_template="img_{:05d}.jpg",
            num_classes=101,
            classnames="ucf101.txt",
        ),
    ),
    **_splits(
        "hmdb51",
        3,
        lambda k: Preset(
            media_dir="images",
            train_list=f"splits/hmdb51_rgb_train_split_{k}.txt",
            val_list=f"splits/hmdb51_rgb_val_split_{k}.txt",
            filename_template="img_{:05d}.jpg",
            num_classes=51,
            classnames="hmdb51.txt",
        ),
    ),
    "kinetics400": Preset(
        media_dir="images",
        train_list="labels/train_videofolder.txt",
        val_list="labels/val_videofolder.txt",
        filename_template="img_{:05d}.jpg",
        num_classes=400,
    ),
}


def get(name: str) -> Preset:
    if name not in PRESETS:
        from aia_jax.data.errors import DataError  # noqa: PLC0415

        raise DataError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
