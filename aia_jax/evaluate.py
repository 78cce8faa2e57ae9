"""Evaluation under the release's test protocols: views, clips, crops, checkpoint ensembles.

    python -m aia_jax.evaluate --config CONFIG --checkpoint DIR [DIR ...] [--workdir OUT]
        [--split val|test] [--test-clips single|twice|dense] [--test-crops 1|3|5|10]
        [--batch-size N] [--average logits|softmax] [--config.data.x=...]

Each video is cut into V = clips x crops views (`data.test_clips`, `data.test_crops`); each
network's per-view logits are averaged (or their softmax, `--average softmax`) into one score
vector per video, and the scores of several checkpoints are averaged again (an ensemble). Top-1,
top-5, per-class and mean class accuracy and the confusion matrix are then counted per video, on
the host, over the valid rows only: batches are padded, sharded over every device along the mesh
axis `data`, and the numbers do not depend on the batch size or the device count.

Mirrored views (10 crops) of a direction-sensitive dataset (Something-Something's left/right
classes, the config's `flip_map`) see the flipped action; by default their logits are permuted
back through the flip map before averaging. `--no-unflip-mirrored` averages them as they are
(the plain average of the release's protocol).

Each network sees clips of its own `num_segments` (from its `model.json`); an ensemble of
networks with different clip lengths reads the data once per length.

`evaluate(config, checkpoints, ...)` is the library entry point (the trainer and tests call it);
it returns the per-video scores (per checkpoint too, and per view on request) with the metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from aia_jax import compilation_cache, metrics_report, modelio, xla_cpu
from aia_jax.errors import (
    ArgumentParser,
    InputNotFoundError,
    UserError,
    add_config_package_to_path,
    load_config_flag,
    one_line,
    positive_int,
    reported_as_usage_errors,
    unknown_override,
)
from aia_jax.train import mesh as mesh_lib

PyTree = Any
AVERAGES = ("logits", "softmax")
CONFIG_FILE = "config.json"  # a training workdir's config, used when --config is not given


@dataclasses.dataclass
class Checkpoint:
    """A network to evaluate: its variables and `model.json` dict."""

    path: str
    variables: PyTree
    meta: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        keys = ("name", "num_classes", "num_segments", "depth", "width", "step", "source")
        return {"path": self.path, **{k: self.meta[k] for k in keys if k in self.meta}}


def load_checkpoint(path: str) -> Checkpoint:
    """A model directory, or a training workdir's best checkpoint (else its latest)."""
    variables, meta = modelio.load_model(path)
    return Checkpoint(os.path.abspath(path), variables, meta)


# ---------------------------------------------------------------------------------------------
# Configuration and the protocol in words.


def data_config_of(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The data config of a training config (its `data` field) or the data config itself."""
    if "data" in config and isinstance(config.data, ml_collections.ConfigDict):
        return config.data
    return config


def _clips_text(c: ml_collections.ConfigDict, lengths: Sequence[int]) -> str:
    from aia_jax.data import sampling

    n = sampling.EVAL_CLIPS[c.test_clips]
    clips = f"{n} clip{'s' if n > 1 else ''} of {'/'.join(str(t) for t in lengths)} frames"
    if c.sampling == "dense3d":
        return f"{clips} {c.frame_interval} apart ('{c.test_clips}', evenly spread)"
    strides = "/".join(str(sampling.DENSE_WINDOW // t) for t in lengths)
    kind = {
        "single": "segment centres",
        "twice": "segment centres, then segment starts",
        "dense": f"stride {strides}, starts evenly spread",
    }[c.test_clips]
    return f"{clips} ('{c.test_clips}': {kind})"


def _crops_text(c: ml_collections.ConfigDict, side: int) -> str:
    if c.resize_short_side:
        resized = f"short side resized to {c.resize_short_side}"
    else:
        resized = f"frames resized to {c.resize[0]}x{c.resize[1]}"
    kind = {
        1: f"1 centre crop {side}x{side}",
        3: f"3 full-resolution crops {side}x{side} (start, end, middle)",
        5: f"5 crops {side}x{side} (4 corners, centre)",
        10: f"10 crops {side}x{side} (4 corners, centre, and their mirrors)",
    }[int(c.test_crops)]
    return f"{kind}, {resized}"


def describe_protocol(
    data_cfg: ml_collections.ConfigDict,
    *,
    split: str,
    average: str = "logits",
    num_checkpoints: int = 1,
    unflip_mirrored: bool = True,
    clip_lengths: Sequence[int] | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The protocol as fields and as one sentence (`description`).

    `clip_lengths`: the networks' frames per clip (default the data config's `num_segments`).
    `dtype`: the networks' compute dtype (bfloat16 scores differ a little from float32 ones).
    """
    from aia_jax import data

    c = data.resolve(data_cfg)
    lengths = sorted(set(clip_lengths or [int(c.num_segments)]))
    views, _, _, side, _ = data.eval_view_shape(c)
    mirrored = any(m for _, _, m in data.eval_views(c))
    flip_pairs = bool(c.flip_map)
    text = (
        f"{split} split: {_clips_text(c, lengths)} x {_crops_text(c, side)} = {views} view"
        f"{'s' if views > 1 else ''} per video; {average} averaged over views"
    )
    if mirrored and flip_pairs:
        text += (
            ", mirrored views' logits mapped through the flip map first"
            if unflip_mirrored
            else ", mirrored views averaged without remapping their flip-paired classes"
        )
    if num_checkpoints > 1:
        text += f", then over {num_checkpoints} checkpoints (ensemble)"
    if dtype != "float32":
        text += f"; computed in {dtype}"
    examples = data.describe_split(c, split)
    text += f"; videos: {examples}"
    return {
        "split": split,
        "examples": examples,
        "sampling": c.sampling,
        "num_segments": lengths[0] if len(lengths) == 1 else lengths,
        "test_clips": c.test_clips,
        "test_crops": int(c.test_crops),
        "views": int(views),
        "view_size": int(side),
        "resize": list(c.resize),
        "resize_short_side": int(c.resize_short_side),
        "crop_size": int(c.crop_size),
        "average": average,
        "unflip_mirrored": bool(unflip_mirrored and mirrored and flip_pairs),
        "num_checkpoints": num_checkpoints,
        "dtype": dtype,
        "description": text,
    }


# ---------------------------------------------------------------------------------------------
# Device side.


def _replicate(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
    """Identical host values on every device of the mesh (works across processes)."""
    sharding = mesh_lib.replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(
            np.shape(x), sharding, lambda idx: np.asarray(x)[idx]
        ),
        tree,
    )


def _host(tree: PyTree) -> PyTree:
    """Replicated global arrays → numpy (each process holds a full copy)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def view_logits_fn(metas: Sequence[Mapping[str, Any]], mesh: jax.sharding.Mesh, compute_dtype: Any):
    """jit: `(variables list, batch) → (logits [M, b, V, K], label, index, valid)`, replicated.

    The batch is sharded along `data`; the outputs are gathered to every device so that each
    process can read the whole global batch. Cached by architecture, so that evaluating again
    (the trainer every epoch, other weights of the same networks) does not recompile.
    """
    key = tuple(
        json.dumps({k: m[k] for k in modelio.CREATE_ARGS + ("name",) if k in m}, sort_keys=True)
        for m in metas
    )
    return _cached_view_logits_fn(key, mesh, jnp.dtype(compute_dtype).name)


@functools.lru_cache(maxsize=16)
def _cached_view_logits_fn(
    metas_json: tuple[str, ...], mesh: jax.sharding.Mesh, compute_dtype: str
):
    from aia_jax import data

    dtype = jnp.dtype(compute_dtype)
    models = [modelio.create_model(json.loads(m), dtype=dtype) for m in metas_json]

    def fn(variables: Sequence[PyTree], batch: Mapping[str, jax.Array]):
        video = batch["video"]  # [b, V, T, H, W, 3]
        b, v = video.shape[:2]
        clips = data.normalize(video.reshape(b * v, *video.shape[2:]), dtype)
        logits = [
            m.apply(var, clips, train=False).astype(jnp.float32).reshape(b, v, -1)
            for m, var in zip(models, variables)
        ]
        return jnp.stack(logits), batch["label"], batch["index"], batch["valid"]

    repl = mesh_lib.replicated(mesh)
    return jax.jit(fn, in_shardings=(repl, mesh_lib.batch_sharded(mesh)), out_shardings=repl)


def _local_device_count(mesh: jax.sharding.Mesh) -> int:
    me = jax.process_index()
    return sum(d.process_index == me for d in mesh.devices.flat)


def _pad_rows(batch: Mapping[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Pads a host batch with invalid rows up to a multiple of this process's device count."""
    n = len(batch["valid"])
    extra = -n % multiple
    if not extra:
        return dict(batch)
    out = {}
    for k, x in batch.items():
        pad = np.zeros((extra, *x.shape[1:]), x.dtype)
        if k == "index":
            pad[:] = -1
        out[k] = np.concatenate([x, pad])
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# The evaluation.


def _run_group(
    checkpoints: Sequence[Checkpoint],
    data_cfg: ml_collections.ConfigDict,
    *,
    split: str,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    compute_dtype: Any,
    show_progress: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """View logits `[M, N, V, K]`, labels `[N]` and list positions `[N]` of the valid videos of
    one group of checkpoints sharing a clip length (rows in list order)."""
    from aia_jax import data

    variables = [_replicate(ck.variables, mesh) for ck in checkpoints]
    step = view_logits_fn([ck.meta for ck in checkpoints], mesh, compute_dtype)
    batches = data.make_eval_iterator(
        data_cfg,
        split=split,
        global_batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    multiple = _local_device_count(mesh)
    if show_progress and jax.process_index() == 0:
        import tqdm

        iterator = tqdm.tqdm(
            batches,
            total=len(batches),
            unit="batch",
            dynamic_ncols=True,
            desc=f"{split} ({len(checkpoints)} net{'s' * (len(checkpoints) > 1)})",
        )
    else:
        iterator = batches
    logits, labels, index = [], [], []

    def collect(outputs) -> None:
        out_logits, out_label, out_index, out_valid = _host(outputs)
        keep = np.asarray(out_valid, bool)
        logits.append(out_logits[:, keep])
        labels.append(out_label[keep])
        index.append(out_index[keep])

    pending = None
    for batch in iterator:
        batch = _pad_rows({k: batch[k] for k in ("video", "label", "index", "valid")}, multiple)
        outputs = step(variables, data.to_global(batch, mesh))
        # Fetch the previous batch only now: the device works while the host reads the next.
        if pending is not None:
            collect(pending)
        pending = outputs
    if pending is not None:
        collect(pending)
    logits_all = np.concatenate(logits, axis=1)
    labels_all, index_all = np.concatenate(labels), np.concatenate(index)
    order = np.argsort(index_all, kind="stable")
    index_all = index_all[order]
    if len(np.unique(index_all)) != len(index_all):
        raise RuntimeError("the eval iterator yielded a video twice")
    return logits_all[:, order], labels_all[order], index_all


def evaluate(
    config: ml_collections.ConfigDict,
    checkpoints: Sequence[str | Checkpoint],
    *,
    split: str = "val",
    test_clips: str | None = None,
    test_crops: int | None = None,
    batch_size: int | None = None,
    average: str = "logits",
    unflip_mirrored: bool = True,
    dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    return_view_logits: bool = False,
    workdir: str | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Evaluates one checkpoint or an ensemble under a test protocol.

    Args:
      config: a training config (its `data`, `eval_batch_size`, `dtype` are read) or a data
        config.
      checkpoints: model directories / training workdirs, or loaded `Checkpoint`s. Their clip
        lengths may differ (the data is then read once per length); classes must match the data.
      split: 'val' or 'test'.
      test_clips, test_crops: override the data config's protocol.
      batch_size: videos per global batch (default `eval_batch_size`, `batch_size`, else 8);
        rounded up to a multiple of the process count. Results do not depend on it.
      average: average 'logits' or 'softmax' scores over views and checkpoints.
      unflip_mirrored: map mirrored views' logits through the flip map before averaging.
      dtype: compute dtype ('float32' or 'bfloat16'; default the config's, else float32).
      mesh: default every device along `data`.
      return_view_logits: add `view_logits` `[M, N, V, K]` (per checkpoint, video, view).
      workdir: when given, the main process writes the report files there (see
        `metrics_report.write_report`).
      show_progress: a progress bar on the main process.

    Returns:
      `protocol` (fields and `description`), `checkpoints` (descriptions), `metrics`
      (`top1`, `top5`, `mean_class_accuracy`, `num_videos`, `num_skipped`), `class_names`, and
      numpy arrays in list order: `index [N]`, `label [N]`, `scores [N, K]` (the ensemble),
      `checkpoint_scores [M, N, K]`, `predictions [N]`, `confusion [K, K]`,
      `class_accuracy [K]` (NaN for classes without videos), `class_count [K]`; with
      `return_view_logits` also `view_logits`. With `average='logits'` the scores are logits,
      else probabilities.
    """
    from aia_jax import data
    from aia_jax.data import config as data_config_lib

    if average not in AVERAGES:
        raise UserError(f"average must be one of {AVERAGES}, got {average!r}")
    if not checkpoints:
        raise UserError("no checkpoint to evaluate")
    data_cfg = ml_collections.ConfigDict(data_config_of(config).to_dict())
    if test_clips is not None:
        data_cfg.test_clips = test_clips
    if test_crops is not None:
        data_cfg.test_crops = int(test_crops)
    data_cfg = data.resolve(data_cfg)
    mesh = mesh if mesh is not None else mesh_lib.make_mesh()
    if batch_size is None:
        batch_size = int(config.get("eval_batch_size") or config.get("batch_size") or 8)
    processes = jax.process_count()
    batch_size = -(-int(batch_size) // processes) * processes
    compute_dtype = jnp.dtype(dtype or config.get("dtype") or "float32")

    if workdir is not None:
        _prepare_workdir(workdir)  # a path that cannot hold the report fails now, not after
    ckpts = [load_checkpoint(c) if isinstance(c, str) else c for c in checkpoints]
    num_classes = data.num_classes(data_cfg)
    for ck in ckpts:
        if int(ck.meta["num_classes"]) != num_classes:
            raise UserError(
                f"{ck.path}: a {ck.meta['num_classes']}-class model, but the data "
                f"has {num_classes} classes"
            )
    flips = [m for _, _, m in data.eval_views(data_cfg)]
    # Read (and checked) before the pass over the data, which may take hours.
    flip_table = data_config_lib.flip_lookup(data_cfg) if unflip_mirrored and any(flips) else None
    try:
        class_names = data.class_names(data_cfg)
    except data.DataError as e:
        if data_cfg.classnames:
            # A file the user named (missing, or a line count that is not the class count):
            # refused now, not replaced by numbers in the report after the whole pass.
            raise
        logging.warning("No class names (%s); using class numbers.", e)
        class_names = [str(i) for i in range(num_classes)]

    # One pass over the data per clip length (the networks' own), all networks of it at once.
    groups: dict[int, list[int]] = {}
    for i, ck in enumerate(ckpts):
        groups.setdefault(int(ck.meta.get("num_segments", data_cfg.num_segments)), []).append(i)
    protocol = describe_protocol(
        data_cfg,
        split=split,
        average=average,
        num_checkpoints=len(ckpts),
        unflip_mirrored=unflip_mirrored,
        clip_lengths=list(groups),
        dtype=compute_dtype.name,
    )
    skipped_before = data.bad_sample_count()

    per_ckpt: list[np.ndarray | None] = [None] * len(ckpts)
    labels = index = None
    for num_segments, members in groups.items():
        group_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
        group_cfg.num_segments = num_segments
        if group_cfg.sampling == "dense3d":
            group_cfg.clip_len = num_segments
        group_logits, group_labels, group_index = _run_group(
            [ckpts[i] for i in members],
            group_cfg,
            split=split,
            batch_size=batch_size,
            mesh=mesh,
            compute_dtype=compute_dtype,
            show_progress=show_progress,
        )
        if index is not None and not np.array_equal(index, group_index):
            # Videos skipped as unreadable in one pass only: keep those every pass saw.
            common = np.intersect1d(index, group_index)
            keep_old, keep_new = np.isin(index, common), np.isin(group_index, common)
            per_ckpt = [None if p is None else p[keep_old] for p in per_ckpt]
            labels, index = labels[keep_old], index[keep_old]
            group_logits, group_index = group_logits[:, keep_new], group_index[keep_new]
        labels, index = group_labels if labels is None else labels, group_index
        for j, i in enumerate(members):
            per_ckpt[i] = group_logits[j]
    view_logits = np.stack(per_ckpt)  # [M, N, V, K]

    if flip_table is not None and not np.array_equal(flip_table, np.arange(num_classes)):
        # A class-c video, mirrored, looks like class flip_table[c]: read c's score there.
        view_logits = view_logits.copy()
        for v, mirrored in enumerate(flips):
            if mirrored:
                view_logits[:, :, v] = view_logits[:, :, v][..., flip_table]
    view_scores = view_logits if average == "logits" else _softmax(view_logits)
    checkpoint_scores = view_scores.mean(axis=2)
    scores = checkpoint_scores.mean(axis=0)

    num_expected = data.num_eval_examples(data_cfg, split)
    if not len(index):
        # Else the metrics' ValueError: a traceback after a pass that only logged warnings.
        raise data.DataError(
            f"{split} split: none of the {num_expected} videos could be read "
            f"({protocol['examples']}); every one was skipped as a bad sample "
            f"(config.data.on_bad_sample {data_cfg.on_bad_sample!r}), the warnings name them"
        )
    metrics = metrics_report.classification_metrics(scores, labels, num_classes)
    skipped = num_expected - len(index)
    if skipped:
        logging.warning(
            "%d of %d videos were unreadable and are not counted (%d bad samples reported).",
            skipped,
            num_expected,
            data.bad_sample_count() - skipped_before,
        )
    results = {
        "protocol": protocol,
        "checkpoints": [ck.describe() for ck in ckpts],
        "metrics": {**metrics_report.scalar_metrics(metrics), "num_skipped": int(skipped)},
        "class_names": list(class_names),
        "index": index,
        "label": labels,
        "scores": scores,
        "checkpoint_scores": checkpoint_scores,
        **{k: metrics[k] for k in ("predictions", "confusion", "class_accuracy", "class_count")},
    }
    if return_view_logits:
        results["view_logits"] = view_logits
    if workdir is not None:
        write_results(workdir, results)
    return results


def _prepare_workdir(workdir: str) -> None:
    """Creates the report folder on the main process, or raises a `UserError` naming it."""
    if jax.process_index() != 0:
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"workdir {workdir}: exists and is not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"workdir {workdir}: cannot create it ({one_line(e)})") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise UserError(f"workdir {workdir}: not writable")


def write_results(workdir: str, results: Mapping[str, Any]) -> dict[str, str]:
    """Writes the report files of `evaluate`'s results (main process only)."""
    if jax.process_index() != 0:
        return {}
    summary = {k: results[k] for k in ("protocol", "checkpoints", "metrics")}
    return metrics_report.write_report(
        workdir,
        metrics=results,
        results=summary,
        index=results["index"],
        labels=results["label"],
        scores=results["scores"],
        class_names=results["class_names"],
        extra_arrays={"checkpoint_scores": results["checkpoint_scores"]},
        title=f"top-1 {100 * results['metrics']['top1']:.2f}%",
    )


def format_results(results: Mapping[str, Any]) -> str:
    """The protocol sentence and the headline numbers."""
    m = results["metrics"]
    lines = [
        f"Protocol: {results['protocol']['description']}.",
        "Checkpoints: " + ", ".join(c["path"] for c in results["checkpoints"]),
        f"top-1 {100 * m['top1']:.2f}%  top-5 {100 * m['top5']:.2f}%  "
        f"mean class accuracy {100 * m['mean_class_accuracy']:.2f}%  "
        f"({m['num_videos']} videos"
        + (f", {m['num_skipped']} unreadable skipped)" if m["num_skipped"] else ")"),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line.


def _parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, ml_collections.ConfigDict | None]:
    """`--config FILE` and `--config.x=v` overrides through ml_collections, the rest argparse."""
    from absl import flags
    from ml_collections import config_flags

    add_config_package_to_path(argv)
    flag_values = flags.FlagValues()  # private: no clash with flags of an embedding program
    holder = config_flags.DEFINE_config_file(
        "config", None, "training or data config file", flag_values=flag_values, sys_argv=list(argv)
    )
    try:
        rest = flag_values(list(argv), known_only=True)
    except (AttributeError, KeyError) as e:
        raise UserError(unknown_override(e, argv)) from None
    except flags.Error as e:
        raise UserError(str(e)) from None
    parser = ArgumentParser(
        prog="python -m aia_jax.evaluate",
        allow_abbrev=False,
        description="Evaluate checkpoints under the release's test protocols. --config FILE "
        "(with --config.x=v overrides) names the data; without it the first workdir's "
        "config.json is used.",
    )
    parser.add_argument(
        "--checkpoint",
        nargs="+",
        required=True,
        help="model directories or training workdirs (several: an ensemble)",
    )
    parser.add_argument("--workdir", default=None, help="where to write the report files")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--test-clips", default=None, choices=("single", "twice", "dense"))
    parser.add_argument("--test-crops", default=None, type=int, choices=(1, 3, 5, 10))
    parser.add_argument(
        "--batch-size", default=None, type=positive_int, help="videos per global batch"
    )
    parser.add_argument("--average", default="logits", choices=AVERAGES)
    parser.add_argument(
        "--unflip-mirrored",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="map mirrored views' logits through the flip map (default on)",
    )
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    args = parser.parse_args(rest[1:])
    if flag_values["config"].value is None:
        return args, None
    return args, load_config_flag(holder, argv)


def _config_from_workdirs(paths: Sequence[str]) -> ml_collections.ConfigDict:
    for path in paths:
        if not os.path.isdir(path):
            raise InputNotFoundError(f"--checkpoint {path}: no such model directory or workdir")
    for path in paths:
        file = os.path.join(path, CONFIG_FILE)
        if os.path.isfile(file):
            logging.info("Using the data config of %s.", file)
            with open(file) as f:
                return ml_collections.ConfigDict(json.load(f))
    raise UserError(f"--config is required: no checkpoint is a training workdir with {CONFIG_FILE}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    with reported_as_usage_errors("python -m aia_jax.evaluate"):
        return _main(argv)


def _main(argv: list[str]) -> int:
    args, config = _parse_args(argv)
    distributed = config.get("distributed") if config is not None else None
    if config is None:
        # Not the training job's `distributed` block: that names its coordinator and this
        # host's process id, and joining that group again would wait for processes that are
        # gone. A multi-host evaluation gets its group from the environment or a --config.
        config = _config_from_workdirs(args.checkpoint)
    # Before anything touches a JAX backend.
    mesh_lib.initialize_distributed(distributed)
    results = evaluate(
        config,
        args.checkpoint,
        split=args.split,
        test_clips=args.test_clips,
        test_crops=args.test_crops,
        batch_size=args.batch_size,
        average=args.average,
        unflip_mirrored=args.unflip_mirrored,
        dtype=args.dtype,
        workdir=args.workdir,
        show_progress=True,
    )
    if jax.process_index() == 0:
        print(format_results(results))
        if args.workdir:
            print(
                f"Wrote {os.path.join(args.workdir, metrics_report.RESULTS_JSON)} and the "
                "per-class, confusion-matrix and score files beside it."
            )
    return 0


if __name__ == "__main__":
    # Only as a command: the flags are process-wide, so importing the module sets none.
    xla_cpu.apply_cpu_flags()
    compilation_cache.use_default()
    sys.exit(main())
