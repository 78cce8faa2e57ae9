"""The built-in default dataset: shapes whose classes differ only in the order of their frames.

Twelve classes in six time-reversal pairs (label 2k is "forward", 2k + 1 its exact reversal):

| pair | label 2k (forward)        | label 2k + 1 (reversed)      | under a horizontal flip |
|------|---------------------------|------------------------------|-------------------------|
| 0    | moving left to right      | moving right to left         | swap                    |
| 1    | moving top to bottom      | moving bottom to top         | keep                    |
| 2    | growing                   | shrinking                    | keep                    |
| 3    | appearing                 | disappearing                 | keep                    |
| 4    | turning clockwise         | turning counter-clockwise    | swap                    |
| 5    | approaching               | separating                   | keep                    |

Each video is 24 frames of 32 x 32: a plain background (flat or a gentle gradient, random
colours), at most one small static distractor, and a large, high-contrast actor (random shape,
colour, size, speed and position) whose motion spans most of the clip, so that the 8 frames a
network samples still show it plainly: small enough for a tiny network to learn on a CPU in
minutes. A clip of label 2k + 1 is *exactly* a clip of label 2k played backwards
(same random parameters), so the frames of a clip, taken as an unordered set, say nothing about
its label within a pair: an order-blind network (TSN's average consensus) is at chance within
each pair. 24 = 3 x 8 frames keeps this true after sampling too: with 8 segments, the release's
train (random frame per segment) and validation (segment centre) indices are mirror-symmetric.

Written as a TFDS dataset (ArrayRecord, read with `tfds.data_source`, no TensorFlow) by
`prepare(data_dir, num_train=..., num_val=..., seed=...)`: deterministic for a seed, skipped when
already there.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

NAME = "aia_temporal_shapes"
VERSION = "2.0.0"  # 2.0.0: 32 x 32, larger actors and motion, lighter clutter
NUM_FRAMES = 24
SIZE = 32
CLASS_NAMES = (
    "moving left to right",
    "moving right to left",
    "moving top to bottom",
    "moving bottom to top",
    "growing",
    "shrinking",
    "appearing",
    "disappearing",
    "turning clockwise",
    "turning counter-clockwise",
    "approaching",
    "separating",
)
NUM_CLASSES = len(CLASS_NAMES)
FLIP_PAIRS = ((0, 1), (8, 9))
# Frames and crop the default training config is meant to use with this dataset.
RECOMMENDED = {"resize": (SIZE, SIZE), "crop_size": 28, "num_segments": 8}
DEFAULT_NUM_TRAIN = 2400
DEFAULT_NUM_VAL = 480

_SHAPES = ("disc", "square", "diamond")


# ---------------------------------------------------------------------------------------------
# Random parameters and rendering (numpy only).


def _colour(rng: np.random.Generator, away_from: np.ndarray | None = None, gap: float = 120.0):
    """A random RGB colour at least `gap` (L1) from `away_from`."""
    for _ in range(50):
        c = rng.uniform(0, 255, size=3)
        if away_from is None or np.abs(c - away_from).sum() >= gap:
            return c
    return 255.0 - away_from


def _progress(rng: np.random.Generator, n: int) -> np.ndarray:
    """Motion progress 0 → 1 over a random active window (random speed and timing)."""
    t0 = rng.uniform(0, n / 8)
    t1 = rng.uniform(7 * n / 8, n - 1)
    return np.clip((np.arange(n) - t0) / (t1 - t0), 0.0, 1.0)


def sample_params(pair: int, rng: np.random.Generator, size: int = SIZE, n: int = NUM_FRAMES):
    """Everything random about one video of `pair` (0..5); rendering it is deterministic.

    Lengths are drawn in units of the frame (`size`), so the geometry holds at any size.
    """
    actor = _colour(rng)
    s = float(size)
    p = {
        "pair": pair,
        "size": size,
        "num_frames": n,
        "actor_colour": actor,
        "shape": _SHAPES[rng.integers(len(_SHAPES))],
        "progress": _progress(rng, n),
        "background": {
            "kind": int(rng.integers(2)),  # flat or a gentle gradient
            "colours": (_colour(rng, actor, gap=240.0), _colour(rng, actor, gap=240.0)),
            "axis": int(rng.integers(2)),
        },
        # At most one small static distractor: some clutter, but the actor dominates.
        "static": [
            {
                "shape": _SHAPES[rng.integers(len(_SHAPES))],
                "centre": rng.uniform(0.1, 0.9, size=2) * s,
                "radius": rng.uniform(0.04, 0.07) * s,
                "colour": _colour(rng, actor, gap=120.0),
            }
            for _ in range(int(rng.random() < 0.5))
        ],
    }
    if pair in (0, 1):  # translation along x (pair 0) or y (pair 1)
        r = rng.uniform(0.13, 0.19) * s
        distance = rng.uniform(0.45, 0.6) * s  # may start or end half out of the frame
        p.update(radius=r, start=rng.uniform(r / 2, s - r / 2 - distance), distance=distance)
        p.update(across=rng.uniform(r + 1, s - r - 1), drift=rng.uniform(-0.06, 0.06) * s)
    elif pair == 2:  # growth
        p.update(r0=rng.uniform(0.04, 0.08) * s, r1=rng.uniform(0.3, 0.38) * s)
        p.update(centre=rng.uniform(0.38, 0.62, size=2) * s)
        p.update(drift=rng.uniform(-0.05, 0.05, size=2) * s)
    elif pair == 3:  # fade in
        r = rng.uniform(0.17, 0.25) * s
        p.update(radius=r, centre=rng.uniform(r + 1, s - r - 1, size=2))
        p.update(drift=rng.uniform(-0.05, 0.05, size=2) * s)
    elif pair == 4:  # a hand turning about its hub
        p.update(centre=rng.uniform(0.42, 0.58, size=2) * s, length=rng.uniform(0.3, 0.38) * s)
        p.update(width=rng.uniform(0.06, 0.09) * s, angle0=rng.uniform(0, 2 * math.pi))
        p.update(sweep=rng.uniform(0.8, 1.3) * math.pi)
    elif pair == 5:  # two actors closing in along an axis
        p.update(radius=rng.uniform(0.1, 0.14) * s, axis_angle=rng.uniform(0, math.pi))
        p.update(centre=rng.uniform(0.45, 0.55, size=2) * s)
        p.update(sep0=rng.uniform(0.42, 0.5) * s, sep1=rng.uniform(0.0, 0.06) * s)
    else:
        raise ValueError(f"pair must be in [0, {NUM_CLASSES // 2}), got {pair}")
    return _float32(p)


def _float32(tree):
    """float64 arrays and scalars → float32 / Python floats, so rendering stays in float32."""
    if isinstance(tree, dict):
        return {k: _float32(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_float32(v) for v in tree)
    if isinstance(tree, np.ndarray) and tree.dtype == np.float64:
        return tree.astype(np.float32)
    if isinstance(tree, np.floating):
        return float(tree)
    return tree


def _coverage(shape: str, dy: np.ndarray, dx: np.ndarray, radius) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape of `radius` at offsets (dy, dx)."""
    if shape == "disc":
        d = np.sqrt(dy * dy + dx * dx)
    elif shape == "square":
        d = np.maximum(np.abs(dy), np.abs(dx)) * 1.15
    else:
        d = (np.abs(dy) + np.abs(dx)) * 0.8
    return np.clip(0.5 + (radius - d), 0.0, 1.0)


def _paint(planes: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Mixes `colour` into channel-first `planes` `[3, ...]` with `alpha`, in place."""
    alpha = alpha.astype(np.float32, copy=False)
    for plane, value in zip(planes, np.asarray(colour, np.float32)):
        plane += alpha * (value - plane)  # channel-first: contiguous broadcasts, ~6x faster


def _background(bg: dict, size: int) -> np.ndarray:
    c0, c1 = (np.asarray(c, np.float32) for c in bg["colours"])
    pos = np.arange(size, dtype=np.float32)
    if bg["kind"] == 0:
        w = np.zeros((size, size), np.float32)
    else:
        w = np.broadcast_to((pos / (size - 1))[:, None], (size, size))
    if bg["axis"]:
        w = w.T
    return c0[:, None, None] * (1 - w[None]) + c1[:, None, None] * w[None]  # [3, S, S]


def render_forward(p: dict) -> np.ndarray:
    """The forward clip (label 2 * pair) of parameters `p`: uint8 `[N, S, S, 3]`."""
    n, s, pair, prog = p["num_frames"], p["size"], p["pair"], p["progress"]
    yy, xx = np.meshgrid(
        np.arange(s, dtype=np.float32), np.arange(s, dtype=np.float32), indexing="ij"
    )
    # Static layers are painted once, then copied to every frame.
    base = _background(p["background"], s).astype(np.float32)
    for d in p["static"]:
        cov = _coverage(d["shape"], yy - d["centre"][0], xx - d["centre"][1], d["radius"])
        _paint(base, cov.astype(np.float32), d["colour"])
    frames = np.repeat(base[:, None], n, axis=1)  # [3, N, S, S]

    t = prog[:, None, None].astype(np.float32)
    shape, colour = p["shape"], p["actor_colour"]
    if pair in (0, 1):
        along = p["start"] + p["distance"] * t
        across = p["across"] + p["drift"] * t
        cy, cx = (across, along) if pair == 0 else (along, across)
        alpha = _coverage(shape, yy - cy, xx - cx, p["radius"])
    elif pair == 2:
        cy = p["centre"][0] + p["drift"][0] * t
        cx = p["centre"][1] + p["drift"][1] * t
        alpha = _coverage(shape, yy - cy, xx - cx, p["r0"] + (p["r1"] - p["r0"]) * t)
    elif pair == 3:
        cy = p["centre"][0] + p["drift"][0] * t
        cx = p["centre"][1] + p["drift"][1] * t
        alpha = _coverage(shape, yy - cy, xx - cx, p["radius"]) * t
    elif pair == 4:
        # Image y points down, so a growing angle turns clockwise on screen.
        angle = p["angle0"] + p["sweep"] * t
        hy, hx = p["centre"]
        ty, tx = np.sin(angle) * p["length"], np.cos(angle) * p["length"]
        py, px = yy - hy, xx - hx
        along = np.clip((py * ty + px * tx) / (p["length"] ** 2), 0.0, 1.0)
        dist = np.sqrt((py - along * ty) ** 2 + (px - along * tx) ** 2)
        hand = np.clip(0.5 + (p["width"] - dist), 0.0, 1.0)
        hub = _coverage("disc", py, px, p["width"] * 1.6)
        alpha = np.maximum(hand, np.broadcast_to(hub, hand.shape))
    else:
        half = (p["sep0"] + (p["sep1"] - p["sep0"]) * t) / 2 + p["radius"]
        uy, ux = math.sin(p["axis_angle"]), math.cos(p["axis_angle"])
        alpha = np.zeros((n, s, s), np.float32)
        for sign in (1.0, -1.0):
            cy = p["centre"][0] + sign * half * uy
            cx = p["centre"][1] + sign * half * ux
            alpha = np.maximum(alpha, _coverage(shape, yy - cy, xx - cx, p["radius"]))
    _paint(frames, np.broadcast_to(alpha, (n, s, s)), colour)
    return np.ascontiguousarray(
        np.clip(np.rint(frames), 0, 255).astype(np.uint8).transpose(1, 2, 3, 0)
    )


def render(label: int, p: dict) -> np.ndarray:
    """The clip of `label` for parameters of its pair: odd labels are the forward clip reversed."""
    if label // 2 != p["pair"]:
        raise ValueError(f"label {label} is not in pair {p['pair']}")
    video = render_forward(p)
    return video[::-1].copy() if label % 2 else video


def example(index: int, split: str, seed: int) -> tuple[np.ndarray, int]:
    """The `index`-th example of `split`: balanced labels (`index % 12`), its own random stream."""
    label = index % NUM_CLASSES
    split_code = {"train": 0, "validation": 1}[split]
    rng = np.random.default_rng([seed, split_code, index])
    return render(label, sample_params(label // 2, rng)), label


# ---------------------------------------------------------------------------------------------
# The TFDS dataset.


def _examples(split: str, count: int, seed: int):
    """`example(i)` for i < count (under a millisecond each: no worker processes needed)."""
    yield from (example(i, split, seed) for i in range(count))


def config_name(num_train: int, num_val: int, seed: int) -> str:
    return f"train{num_train}-val{num_val}-seed{seed}"


def dataset_name(num_train: int = DEFAULT_NUM_TRAIN, num_val: int = DEFAULT_NUM_VAL, seed: int = 0):
    """The `tfds.data_source` name of a prepared size and seed."""
    return f"{NAME}/{config_name(num_train, num_val, seed)}:{VERSION}"


_builder_class = None
_local_info_class = None


def local_dataset_info(**kwargs):
    """`tfds.core.DatasetInfo(**kwargs)` for a dataset written here, never in TFDS's GCS bucket.

    A builder whose dataset is not prepared yet asks its info to load precomputed metadata from
    the bucket; TFDS makes a temporary directory before it finds GCS switched off, and never
    removes it (one empty `/tmp/tmp*tfds` per builder). There is nothing to load, so skip it.
    """
    global _local_info_class
    if _local_info_class is None:
        import tensorflow_datasets as tfds  # noqa: PLC0415

        class LocalDatasetInfo(tfds.core.DatasetInfo):
            def initialize_from_bucket(self) -> None:
                pass

        _local_info_class = LocalDatasetInfo
    return _local_info_class(**kwargs)


def builder_class():
    """The `tfds.core.GeneratorBasedBuilder` (defined on first use: TFDS is slow to import)."""
    global _builder_class
    if _builder_class is not None:
        return _builder_class
    import tensorflow_datasets as tfds  # noqa: PLC0415

    @dataclasses.dataclass
    class SizeConfig(tfds.core.BuilderConfig):
        num_train: int = DEFAULT_NUM_TRAIN
        num_val: int = DEFAULT_NUM_VAL
        seed: int = 0

    class AiaTemporalShapes(tfds.core.GeneratorBasedBuilder):
        """Synthetic shapes whose 12 classes are 6 time-reversal pairs (see the module doc)."""

        VERSION = tfds.core.Version(VERSION)
        # No checksums or metadata files to look up beside the code (and the lookup needs
        # importlib_resources, which TFDS does not install).
        code_path = None
        BUILDER_CONFIGS = [SizeConfig(name=config_name(DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, 0))]

        def _info(self):
            return local_dataset_info(
                builder=self,
                description=__doc__.split("\n\n")[0],
                features=tfds.features.FeaturesDict(
                    {
                        "video": tfds.features.Tensor(
                            shape=(NUM_FRAMES, SIZE, SIZE, 3), dtype=np.uint8, encoding="zlib"
                        ),
                        "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                    }
                ),
                supervised_keys=("video", "label"),
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download
            c = self.builder_config
            return {
                "train": self._generate_examples("train", c.num_train, c.seed),
                "validation": self._generate_examples("validation", c.num_val, c.seed),
            }

        def _generate_examples(self, split, count, seed):
            for i, (video, label) in enumerate(_examples(split, count, seed)):
                yield i, {"video": video, "label": label}

    _builder_class = (AiaTemporalShapes, SizeConfig)
    return _builder_class


def prepare(
    data_dir: str | None = None,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    seed: int = 0,
) -> str:
    """Writes the dataset under `data_dir` (TFDS's default when None) unless it is there.

    Returns the name to give `tfds.data_source` (with `data_dir`).
    """
    import tensorflow_datasets as tfds  # noqa: PLC0415

    name = dataset_name(num_train, num_val, seed)
    data_dir = data_dir or None
    directory = os.path.join(
        data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets"),
        NAME,
        config_name(num_train, num_val, seed),
        VERSION,
    )
    if os.path.isfile(os.path.join(directory, "dataset_info.json")):
        return name
    builder_cls, config_cls = builder_class()
    config = config_name(num_train, num_val, seed)
    if config not in builder_cls.builder_configs:
        config = config_cls(name=config, num_train=num_train, num_val=num_val, seed=seed)
    tfds.disable_progress_bar()
    builder = builder_cls(data_dir=data_dir, config=config, file_format="array_record")
    builder.download_and_prepare()
    return name
