"""grain pipelines: host-sharded, deterministic, checkpointable train and eval iterators.

Train: every epoch is one global permutation of the videos (grain's index shuffle, reseeded per
epoch); global step s takes positions `[s * G, (s + 1) * G)` of it and process p reads rows
`[p * b, (p + 1) * b)` of that block (b = G / process_count), so each process reads only its own
videos and the global batch does not depend on the number of processes. The last `n % G` videos
of each epoch's permutation are dropped. A sample's augmentation is drawn from
`(seed, epoch, video index)`, never from the worker that reads it.

Eval: global position q = s * G + p * b + row; positions past the end are padding rows
(`valid=False`) so that every batch, on every process, has the same shape.

Reading and augmentation run in `num_workers` processes (`mp_prefetch`); batches are assembled in
the calling process, so batches are the same for any worker count, and the train iterator's state
(`get_state` / `set_state`, or Orbax through `grain.checkpoint.CheckpointSave/CheckpointRestore`)
is the number of host-local elements read, so it restores the exact position under any worker
count.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from typing import Any

import grain
import ml_collections
import numpy as np

from aia_jax.data import config as config_lib
from aia_jax.data import errors, sampling, sources, transforms
from aia_jax.data.errors import BadSampleError, DataError

_BAD = "_bad"  # key of the element that stands for a skipped sample
log = logging.getLogger(__name__)


def _processes(index: int | None, count: int | None) -> tuple[int, int]:
    if index is None or count is None:
        import jax  # noqa: PLC0415

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise DataError(f"process_index {index} outside [0, {count})")
    return index, count


def _host_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise DataError(
            f"global_batch_size {global_batch_size} must be a positive multiple of "
            f"process_count {process_count}"
        )
    return global_batch_size // process_count


def _mix_seed(seed: int) -> int:
    """A 32-bit shuffle seed from the user seed (grain adds the epoch to it: spread them)."""
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# Which video each host-local element is.


class TrainPositions(grain.MapDataset):
    """Host-local element i → `(epoch, position in the epoch's order, video index)`; infinite."""

    def __init__(
        self, num_videos: int, global_batch: int, process_index: int, process_count: int, seed: int
    ):
        super().__init__()
        self.num_videos, self.global_batch = num_videos, global_batch
        self.host_batch = global_batch // process_count
        self.process_index = process_index
        self.steps_per_epoch = num_videos // global_batch
        self._order = grain.MapDataset.range(num_videos).shuffle(seed=_mix_seed(seed))

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"TrainPositions(n={self.num_videos}, G={self.global_batch}, p={self.process_index})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, row = divmod(index, self.host_batch)
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        position = step_in_epoch * self.global_batch + self.process_index * self.host_batch + row
        video = int(self._order[epoch * self.num_videos + position]) % self.num_videos
        return epoch, position, video


class EvalPositions(grain.MapDataset):
    """Host-local element i → global list position, or -1 for a padding row."""

    def __init__(self, num_videos: int, global_batch: int, process_index: int, process_count: int):
        super().__init__()
        self.num_videos, self.global_batch = num_videos, global_batch
        self.host_batch = global_batch // process_count
        self.process_index = process_index
        self.num_batches = max(1, math.ceil(num_videos / global_batch))

    def __len__(self) -> int:
        return self.num_batches * self.host_batch

    def __str__(self) -> str:
        return f"EvalPositions(n={self.num_videos}, G={self.global_batch}, p={self.process_index})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, row = divmod(index, self.host_batch)
        position = step * self.global_batch + self.process_index * self.host_batch + row
        return position if position < self.num_videos else -1


# ---------------------------------------------------------------------------------------------
# Per-sample work (runs in the worker processes; must pickle).


@dataclasses.dataclass
class _SampleReader:
    source: sources.Source
    config: dict[str, Any]

    def __post_init__(self):
        c = ml_collections.ConfigDict(self.config)
        self.geometry = transforms.Geometry.from_config(c)
        self.num_classes = int(c.num_classes)
        self.policy = c.on_bad_sample

    def _cfg(self, key: str) -> Any:
        return self.config[key]

    def _check_label(self, label: int, index: int) -> None:
        if self.num_classes and not 0 <= label < self.num_classes:
            raise DataError(
                f"{self.source.describe(index)}: label {label} is outside [0, {self.num_classes})"
            )

    def _bad(self, index: int, error: BadSampleError) -> dict[str, Any]:
        message = f"{self.source.describe(index)}: {error}"
        if self.policy == "raise":
            raise BadSampleError(message) from None
        return {_BAD: message}


class TrainSample(_SampleReader):
    """`(epoch, position, video)` → `{'video': uint8 [T, S, S, 3], 'label': int32}`."""

    def __init__(
        self, source: sources.Source, config: dict[str, Any], seed: int, flip_lut: np.ndarray
    ):
        super().__init__(source, config)
        self.seed, self.flip_lut = seed, flip_lut

    def __call__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        epoch, _, video = item
        rng = np.random.default_rng([self.seed, epoch, video])
        cfg = self._cfg

        def pick(num_frames: int) -> np.ndarray:
            return sampling.train_indices(
                num_frames,
                sampling=cfg("sampling"),
                num_segments=cfg("num_segments"),
                clip_len=cfg("clip_len") or cfg("num_segments"),
                frame_interval=cfg("frame_interval"),
                rng=rng,
            )

        try:
            frames, label = self.source.read(video, pick)
            self._check_label(label, video)
            clip, label = transforms.train_clip(frames, label, self.geometry, self.flip_lut, rng)
        except BadSampleError as e:
            return self._bad(video, e)
        return {"video": clip, "label": np.int32(label)}


class EvalSample(_SampleReader):
    """List position → `{'video': uint8 [V, T, s, s, 3], 'label', 'index', 'valid'}`."""

    def __init__(self, source: sources.Source, config: dict[str, Any]):
        super().__init__(source, config)
        c = ml_collections.ConfigDict(config)
        self.view_shape = eval_view_shape(c)

    def _padding(self, position: int) -> dict[str, Any]:
        return {
            "video": np.zeros(self.view_shape, np.uint8),
            "label": np.int32(0),
            "index": np.int32(position),
            "valid": np.bool_(False),
        }

    def __call__(self, position: int) -> dict[str, Any]:
        if position < 0:
            return self._padding(-1)
        cfg = self._cfg

        def pick(num_frames: int) -> np.ndarray:
            return sampling.eval_indices(
                num_frames,
                sampling=cfg("sampling"),
                test_clips=cfg("test_clips"),
                num_segments=cfg("num_segments"),
                clip_len=cfg("clip_len") or cfg("num_segments"),
                frame_interval=cfg("frame_interval"),
            )

        try:
            clips, label = self.source.read(position, pick)
            self._check_label(label, position)
            views = transforms.eval_clips(clips, self.geometry)
        except BadSampleError as e:
            return {**self._padding(position), **self._bad(position, e)}
        if views.shape != self.view_shape:
            raise DataError(
                f"{self.source.describe(position)}: views {views.shape}, expected {self.view_shape}"
            )
        return {
            "video": views,
            "label": np.int32(label),
            "index": np.int32(position),
            "valid": np.bool_(True),
        }


# ---------------------------------------------------------------------------------------------
# Main-process steps: count the skipped samples where the trainer can read the count.


# With every sample failing (a wrong `filename_template`, an unmounted media folder), skipping
# would search forever; this many failures in a row stop the iterator instead.
MAX_CONSECUTIVE_BAD = 64


class _KeepGood:
    """The filter of skipped training samples; raises after `MAX_CONSECUTIVE_BAD` in a row."""

    def __init__(self) -> None:
        self.in_a_row = 0

    def __call__(self, element: dict[str, Any]) -> bool:
        if _BAD not in element:
            self.in_a_row = 0
            return True
        errors.record_skip(element[_BAD])
        log.warning("skipped a bad sample: %s", element[_BAD])
        self.in_a_row += 1
        if self.in_a_row >= MAX_CONSECUTIVE_BAD:
            raise DataError(
                f"{self.in_a_row} training samples in a row could not be read (the last: "
                f"{element[_BAD]}); check the data paths and config.data.filename_template"
            )
        return False


def _count_bad(element: dict[str, Any]) -> dict[str, Any]:
    if _BAD in element:
        errors.record_skip(element[_BAD])
        log.warning("bad sample, evaluated as padding: %s", element[_BAD])
        element = {k: v for k, v in element.items() if k != _BAD}
    return element


def _read_in_workers(
    ds: grain.MapDataset, c: ml_collections.ConfigDict, host_batch: int
) -> grain.IterDataset:
    workers = int(c.num_workers)
    ahead = max(1, int(c.prefetch_buffer)) * host_batch
    per_reader = math.ceil(ahead / max(1, workers))
    it = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=max(1, int(c.read_threads)),
            prefetch_buffer_size=max(per_reader, int(c.read_threads)),
        )
    )
    if workers > 0:
        _parse_absl_flags()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=per_reader)
        )
    return it


def _parse_absl_flags() -> None:
    """grain 0.2.18 reads an absl flag when starting workers and fails if flags are unparsed
    (google/grain#1355, fixed after 0.2.18); outside `absl.app`, take the flags' defaults."""
    from absl import flags  # noqa: PLC0415

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ---------------------------------------------------------------------------------------------
# Public entry points.


def steps_per_epoch(data_config: ml_collections.ConfigDict, global_batch_size: int) -> int:
    """Global train steps in one epoch (the remainder of the permutation is dropped)."""
    return len(config_lib.make_source(data_config, "train")) // global_batch_size


def make_train_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainBatches:
    """Infinite iterator of this process's train batches, `{'video', 'label'}` (see module doc)."""
    c = config_lib.resolve(data_config)
    index, count = _processes(process_index, process_count)
    host_batch = _host_batch(global_batch_size, count)
    source = config_lib.make_source(c, "train")
    if len(source) < global_batch_size:
        raise DataError(
            f"{len(source)} training videos are fewer than global_batch_size {global_batch_size}"
        )
    positions = TrainPositions(len(source), global_batch_size, index, count, seed)
    sample = TrainSample(source, c.to_dict(), seed, config_lib.flip_lookup(c))
    return TrainBatches(positions.map(sample), c, host_batch)


class TrainBatches(grain.DatasetIterator):
    """This process's train batches; the state is the number of elements read (skipped ones too).

    grain's own state of a multiprocess pipeline is one position per worker, which a run with
    another `num_workers` cannot restore; the elements are a function of their index, so one
    number restores the same batches under any worker count.
    """

    def __init__(
        self, elements: grain.MapDataset, c: ml_collections.ConfigDict, host_batch: int
    ) -> None:
        super().__init__()
        self._elements, self._config, self._host_batch = elements, c, host_batch
        self._next = 0  # host-local index of the next element to read
        self._reader: grain.DatasetIterator | None = None
        self._keep = _KeepGood()

    def __str__(self) -> str:
        return f"TrainBatches(next_element={self._next})"

    def _open(self) -> grain.DatasetIterator:
        if self._reader is None:
            elements = self._elements[self._next :] if self._next else self._elements
            self._reader = iter(_read_in_workers(elements, self._config, self._host_batch))
        return self._reader

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        reader = self._open()
        rows: list[dict[str, Any]] = []
        while len(rows) < self._host_batch:
            element = next(reader)
            self._next += 1
            if self._keep(element):
                rows.append(element)
        return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

    def get_state(self) -> dict[str, Any]:
        return {"next_element": self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        self._close_reader()
        self._next = _next_element(state)
        self._keep = _KeepGood()

    def start_prefetch(self) -> None:
        self._open().start_prefetch()

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def close(self) -> None:
        self._close_reader()
        super().close()


def _next_element(state: dict[str, Any]) -> int:
    """The element position of a `TrainBatches` state, or of the grain pipeline state that
    earlier versions saved (one reader: its `next_index`; worker processes: the sum of the
    workers' positions, as each worker reads every `num_workers`-th element)."""
    if "next_element" in state:
        return int(state["next_element"])
    if "next_index" in state:
        return int(state["next_index"])
    if "iterators_in_use_states" in state:
        return sum(int(s["next_index"]) for s in state["iterators_in_use_states"])
    raise DataError(f"unknown train iterator state {sorted(state)}: not written by aia_jax")


class EvalIterable:
    """Re-iterable eval batches of one process; `len()` is the number of batches (every host)."""

    def __init__(self, dataset: grain.IterDataset, num_batches: int, num_examples: int):
        self._dataset, self.num_batches, self.num_examples = dataset, num_batches, num_examples

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self._dataset)

    def __len__(self) -> int:
        return self.num_batches


def make_eval_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    split: str = "val",
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalIterable:
    """Every video of `split` once over all processes, `{'video', 'label', 'index', 'valid'}`."""
    c = config_lib.resolve(data_config)
    index, count = _processes(process_index, process_count)
    host_batch = _host_batch(global_batch_size, count)
    source = config_lib.make_source(c, split)
    positions = EvalPositions(len(source), global_batch_size, index, count)
    ds = _read_in_workers(positions.map(EvalSample(source, c.to_dict())), c, host_batch)
    ds = ds.map(_count_bad).batch(host_batch, drop_remainder=False)
    return EvalIterable(ds, positions.num_batches, len(source))


def num_eval_examples(data_config: ml_collections.ConfigDict, split: str = "val") -> int:
    """Videos in `split` ('val' | 'test'): each appears once, over all processes."""
    return len(config_lib.make_source(data_config, split))


def num_train_examples(data_config: ml_collections.ConfigDict) -> int:
    """Videos in the training split (an epoch uses `steps_per_epoch * global_batch` of them)."""
    return len(config_lib.make_source(data_config, "train"))


def eval_view_shape(data_config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """`(V, T, s, s, 3)` of one eval sample under the config's test protocol."""
    c = config_lib.resolve(data_config)
    geometry = transforms.Geometry.from_config(c)
    clips = sampling.EVAL_CLIPS[c.test_clips]
    crops = geometry.test_crops
    if crops == 3:
        short = c.resize_short_side or min(c.resize)
        side = int(short)
    else:
        side = geometry.crop_size
    return (clips * crops, config_lib.clip_length(c), side, side, 3)


def eval_views(data_config: ml_collections.ConfigDict) -> list[tuple[int, int, bool]]:
    """`(clip, crop, mirrored)` of each of the V views, in order.

    Mirrored views of a direction-sensitive dataset predict the flipped class: permute their
    logits with the flip map before averaging.
    """
    c = config_lib.resolve(data_config)
    clips = sampling.EVAL_CLIPS[c.test_clips]
    flips = [False] * c.test_crops if c.test_crops != 10 else [False, True] * 5
    return [(clip, crop, flips[crop]) for clip in range(clips) for crop in range(c.test_crops)]
