"""Small datasets written on the spot, for tests and the input benchmark.

Every frame is one flat colour that encodes where it came from: red = 8 * frame index (0-based,
mod 256), green = 20 * video index (mod 256), blue = 128 — so a test can read back which frames a
clip holds (`frame_ids`, modulo 32) even after JPEG or video compression, resizing and cropping.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from aia_jax.data import synthetic


def frame_pixels(video: int, frame: int, size: tuple[int, int]) -> np.ndarray:
    colour = np.array([(8 * frame) % 256, (20 * video) % 256, 128], np.uint8)
    return np.broadcast_to(colour, (*size, 3)).copy()


def frame_ids(clip: np.ndarray) -> np.ndarray:
    """The 0-based frame index (mod 32) of each frame of `clip` `[..., H, W, 3]`, from its red."""
    red = clip[..., 0].reshape(*clip.shape[:-3], clip.shape[-3] * clip.shape[-2]).mean(-1)
    return np.rint(red / 8.0).astype(int) % 32


def video_ids(clip: np.ndarray) -> np.ndarray:
    """The video index (mod 13) of each frame of `clip` `[..., H, W, 3]`, from its green."""
    green = clip[..., 1].reshape(*clip.shape[:-3], clip.shape[-3] * clip.shape[-2]).mean(-1)
    return np.rint(green / 20.0).astype(int) % 13


def _counts(num_frames: int | Sequence[int], num_videos: int) -> list[int]:
    if isinstance(num_frames, int):
        return [num_frames] * num_videos
    return list(num_frames)


def write_frame_folders(
    root: str,
    num_videos: int,
    num_frames: int | Sequence[int] = 12,
    *,
    size: tuple[int, int] = (24, 32),
    num_classes: int = 4,
    template: str = "img_{:05d}.jpg",
    list_name: str = "train.txt",
    media_dir: str = "frames",
    first_frame: int = 1,
) -> str:
    """`root/media_dir/vid{i}/template.format(first_frame + 0..n-1)` JPEGs (pixels encoding the
    video and the frame index, see `frame_ids`) and a `dir num_frames label` list."""
    from PIL import Image  # noqa: PLC0415

    lines = []
    for i, n in enumerate(_counts(num_frames, num_videos)):
        folder = os.path.join(root, media_dir, f"vid{i:03d}")
        os.makedirs(folder, exist_ok=True)
        for f in range(n):
            path = os.path.join(folder, template.format(f + first_frame))
            Image.fromarray(frame_pixels(i, f, size)).save(path, quality=95)
        lines.append(f"vid{i:03d} {n} {i % num_classes}")
    list_path = os.path.join(root, list_name)
    with open(list_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return list_path


def write_video(
    path: str,
    num_frames: int,
    video: int = 0,
    *,
    size: tuple[int, int] = (24, 32),
    codec: str = "",
    fps: int = 25,
    gop: int = 8,
) -> None:
    """A video file whose frames follow `frame_pixels` (codec from the extension by default)."""
    import av  # noqa: PLC0415

    ext = os.path.splitext(path)[1].lower()
    codec = codec or {".mp4": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4"}[ext]
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        stream.gop_size = gop
        for f in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_pixels(video, f, size), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_video_files(
    root: str,
    num_videos: int,
    num_frames: int | Sequence[int] = 12,
    *,
    ext: str = "mp4",
    size: tuple[int, int] = (24, 32),
    num_classes: int = 4,
    list_name: str = "train.txt",
    media_dir: str = "videos",
    class_folders: bool = False,
) -> str:
    """Videos and a `file label` list (returned), or with `class_folders` one folder per class
    (named `class{k}`; the folder is returned)."""
    lines = []
    base = os.path.join(root, media_dir)
    for i, n in enumerate(_counts(num_frames, num_videos)):
        label = i % num_classes
        rel = (
            os.path.join(f"class{label}", f"v{i:03d}.{ext}") if class_folders else f"v{i:03d}.{ext}"
        )
        os.makedirs(os.path.dirname(os.path.join(base, rel)), exist_ok=True)
        write_video(os.path.join(base, rel), n, i, size=size)
        lines.append(f"{rel} {label}")
    if class_folders:
        return base
    list_path = os.path.join(root, list_name)
    with open(list_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return list_path


def write_tfds(
    data_dir: str,
    name: str,
    splits: dict[str, int],
    num_frames: int = 12,
    *,
    size: tuple[int, int] = (24, 32),
    num_classes: int = 4,
    channels: int = 3,
    dtype: npt.DTypeLike = np.uint8,
) -> None:
    """A TFDS dataset `name` (uint8 tensor videos, ClassLabel labels) through a TFDS builder.

    Frames are `frame_pixels`; `channels` other than 3 keep its first ones (1: grey, 2) or add
    an alpha channel of 200 and any further ones of 60 (4: RGBA, 5, …). Another `dtype` stores
    them as that type (a float one scaled to [0, 1]).
    """
    import tensorflow_datasets as tfds  # noqa: PLC0415

    def frame(video: int, f: int) -> np.ndarray:
        rgb = frame_pixels(video, f, size)
        if channels <= 3:
            return rgb[..., :channels]
        extra = np.full((*size, channels - 3), 60, np.uint8)
        extra[..., 0] = 200
        return np.concatenate([rgb, extra], -1)

    with tfds.core.registered.skip_registration():

        class Builder(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")
            code_path = None

            def _info(self):
                return synthetic.local_dataset_info(
                    builder=self,
                    features=tfds.features.FeaturesDict(
                        {
                            "video": tfds.features.Tensor(
                                shape=(num_frames, *size, channels),
                                dtype=dtype,
                                encoding="zlib",
                            ),
                            "label": tfds.features.ClassLabel(num_classes=num_classes),
                        }
                    ),
                )

            def _split_generators(self, dl_manager):
                return {s: self._generate_examples(s, n) for s, n in splits.items()}

            def _generate_examples(self, split, n):
                for i in range(n):
                    video = np.stack([frame(i, f) for f in range(num_frames)])
                    if np.issubdtype(dtype, np.floating):
                        video = video / 255
                    video = video.astype(dtype)
                    yield f"{split}{i}", {"video": video, "label": i % num_classes}

        Builder.name = name
        tfds.disable_progress_bar()
        Builder(data_dir=data_dir, file_format="array_record").download_and_prepare()


def write_raw_video_tfds(
    data_dir: str,
    name: str,
    split: str,
    num_videos: int,
    num_frames: int = 12,
    *,
    size: tuple[int, int] = (24, 32),
    num_classes: int = 4,
    corrupt: Sequence[int] = (),
    shard_lengths: Sequence[int] = (),
    first: int = 0,
) -> None:
    """A prepared TFDS dataset with a `Video` feature (PNG frames), written without TFDS's writer
    (which would need TensorFlow for `Video`): ArrayRecord of `tf.train.Example` + metadata.

    Video k of the split is video `first + k` of `frame_pixels`, label `(first + k) %
    num_classes`; videos in `corrupt` (k) get an undecodable frame 1. `shard_lengths` (default:
    one shard) spread them over files. Called again for another split, it adds that split.
    """
    import io  # noqa: PLC0415

    from array_record.python import array_record_module  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415
    from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2  # noqa: PLC0415

    directory = os.path.join(data_dir, name, "1.0.0")
    os.makedirs(directory, exist_ok=True)
    shard_lengths = list(shard_lengths) or [num_videos]
    assert sum(shard_lengths) == num_videos, (shard_lengths, num_videos)
    starts = np.cumsum([0, *shard_lengths])
    for shard, n in enumerate(shard_lengths):
        of = len(shard_lengths)
        path = os.path.join(directory, f"{name}-{split}.array_record-{shard:05d}-of-{of:05d}")
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        for i in range(int(starts[shard]), int(starts[shard]) + n):
            frames = []
            for f in range(num_frames):
                buffer = io.BytesIO()
                Image.fromarray(frame_pixels(first + i, f, size)).save(buffer, format="PNG")
                frames.append(b"not a png" if (i in corrupt and f == 1) else buffer.getvalue())
            label = (first + i) % num_classes
            feature = {
                "video": tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(value=frames)),
                "label": tf_feature_pb2.Feature(int64_list=tf_feature_pb2.Int64List(value=[label])),
            }
            example = tf_example_pb2.Example(features=tf_feature_pb2.Features(feature=feature))
            writer.write(example.SerializeToString())
        writer.close()
    info_path = os.path.join(directory, "dataset_info.json")
    splits = []
    if os.path.isfile(info_path):
        with open(info_path) as f:
            splits = [s for s in json.load(f)["splits"] if s["name"] != split]
    info = {
        "fileFormat": "array_record",
        "name": name,
        "version": "1.0.0",
        "splits": [
            *splits,
            {
                "name": split,
                "shardLengths": [str(n) for n in shard_lengths],
                "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            },
        ],
    }
    features = {
        "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
        "featuresDict": {
            "features": {
                "video": {
                    "pythonClassName": "tensorflow_datasets.core.features.video_feature.Video",
                    "video": {
                        "shape": {"dimensions": [str(num_frames), str(size[0]), str(size[1]), "3"]},
                        "dtype": "uint8",
                        "encodingFormat": "png",
                    },
                },
                "label": {
                    "pythonClassName": (
                        "tensorflow_datasets.core.features.class_label_feature.ClassLabel"
                    ),
                    "classLabel": {"numClasses": str(num_classes)},
                },
            }
        },
    }
    with open(os.path.join(directory, "dataset_info.json"), "w") as f:
        json.dump(info, f)
    with open(os.path.join(directory, "features.json"), "w") as f:
        json.dump(features, f)
