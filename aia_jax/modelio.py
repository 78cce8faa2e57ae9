"""Model directories: a network's variables and what is needed to rebuild it.

A *model directory* holds
- `model.json`: `{"format": "aia-jax-model", "version": 1, "name": <release name>,
  "num_classes", "num_segments", "depth", "width", "dropout", ...}` — the `models.create`
  arguments (dtypes are a run-time choice and not stored) plus free-form extras (e.g. `source`);
- `variables/`: an Orbax checkpoint of `{'params': ..., 'batch_stats': ...}`.

The converter writes one, the trainer's `init_from` and the evaluator read one. `load_model`
also accepts a training workdir (`model.json` beside `checkpoints/`) and then reads its best
checkpoint by validation top-1 (the latest when none was evaluated).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from aia_jax.errors import InputNotFoundError, UserError, one_line
from aia_jax.fileio import write_atomically

PyTree = Any

MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"
FORMAT = "aia-jax-model"
VERSION = 1
# `models.create` keyword arguments recorded in model.json (besides `name`).
CREATE_ARGS = ("num_classes", "num_segments", "depth", "width", "dropout", "shift_place")


def model_meta(name: str, **create_kwargs: Any) -> dict[str, Any]:
    """A `model.json` dict for `models.create(name, **create_kwargs)`; extras are kept as-is."""
    meta = {"format": FORMAT, "version": VERSION, "name": name}
    meta.update(create_kwargs)
    return meta


def meta_from_model(model: Any, name: str | None = None) -> dict[str, Any]:
    """The `model.json` dict of a `VideoNet` instance (`name` defaults to its canonical name)."""
    if name is None:
        from aia_jax.models import ModelName

        name = ModelName(model.form, model.placement).canonical
    return model_meta(name, **{k: getattr(model, k) for k in CREATE_ARGS if hasattr(model, k)})


def create_model(meta: Mapping[str, Any], **overrides: Any):
    """`models.create` from a `model.json` dict; `overrides` (e.g. `dtype`) win."""
    from aia_jax import models

    kwargs = {k: meta[k] for k in CREATE_ARGS if k in meta}
    kwargs.update(overrides)
    return models.create(meta["name"], **kwargs)


def write_meta(directory: str, meta: Mapping[str, Any]) -> None:
    """Writes `model.json` into `directory` (atomically: temporary file, then rename)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, MODEL_JSON)
    write_atomically(path, json.dumps(dict(meta), indent=2, sort_keys=True) + "\n")


def read_meta(directory: str) -> dict[str, Any]:
    """Reads `model.json` from a model directory or training workdir."""
    path = os.path.join(directory, MODEL_JSON)
    if os.path.isfile(directory) and directory.endswith((".pth", ".pth.tar", ".safetensors")):
        raise InputNotFoundError(
            f"{directory}: a PyTorch checkpoint, not a model directory; convert it first with "
            "`python -m aia_jax.convert torch2flax`"
        )
    if not os.path.exists(path):
        raise InputNotFoundError(f"{path} not found: {directory} is not a model directory")
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "name" not in meta:
        raise UserError(f"{path} has no model 'name'")
    return meta


def save_model(directory: str, variables: Mapping[str, PyTree], meta: Mapping[str, Any]) -> None:
    """Writes a model directory: `model.json` and `variables/` (params and batch_stats).

    Call on every process (Orbax coordinates multi-host writes); blocks until written.
    Refuses to overwrite an existing `variables/`.
    """
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    if "name" not in meta:
        raise ValueError("meta needs the model 'name' (see modelio.model_meta)")
    path = os.path.abspath(os.path.join(directory, VARIABLES_DIR))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, variables)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        write_meta(directory, {"format": FORMAT, "version": VERSION, **meta})


def restore_numpy(path: str, keys: tuple[str, ...] | None = None) -> PyTree:
    """Restores an Orbax pytree checkpoint as host numpy arrays (independent of devices).

    Args:
      path: the checkpoint's directory.
      keys: restore only these top-level entries (default: all).

    Raises:
      UserError: the checkpoint is incomplete or damaged (naming `path`).
    """
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            item = ckptr.metadata(path).item_metadata
            if item is None:
                raise ValueError("its _METADATA is missing")
            tree = item.tree
            if keys is not None:
                tree = {k: tree[k] for k in keys}
            args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            if keys is None:
                restore = ocp.args.PyTreeRestore(restore_args=args)
            else:
                restore = ocp.args.PyTreeRestore(item=tree, restore_args=args, partial_restore=True)
            return ckptr.restore(path, args=restore)
    except (ValueError, KeyError, OSError) as e:
        quiet_closed_event_loop()
        raise UserError(
            f"{path}: cannot read this checkpoint, it is incomplete or damaged "
            f"({one_line(e)[:300]})"
        ) from None


def quiet_closed_event_loop() -> None:
    """Drops the reports of reads still in flight when a restore failed.

    Orbax closes its event loop on the first failed read; the other reads then complete and
    each reports 'Event loop is closed' through `sys.unraisablehook`, burying the real error.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_event_loop", False):
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_event_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def load_model(path: str, *, step: int | None = None) -> tuple[dict[str, PyTree], dict[str, Any]]:
    """Reads a model directory or a training workdir.

    Args:
      path: a model directory (`model.json` + `variables/`) or a training workdir
        (`model.json` + `checkpoints/`).
      step: workdir only: which checkpoint; default the best by validation top-1, else the
        latest.

    Returns:
      `(variables, meta)`: `{'params', 'batch_stats'}` as numpy arrays, and the `model.json`
      dict (for a workdir with `"step"` added).
    """
    meta = read_meta(path)
    if os.path.isdir(os.path.join(path, VARIABLES_DIR)):
        if step is not None:
            # A model directory holds one set of variables; ignoring the step would hand back
            # another network than the one asked for without a word.
            raise UserError(
                f"step {step}: {path} is a model directory with one set of variables, not a "
                "training workdir; leave out the step"
            )
        tree = restore_numpy(os.path.abspath(os.path.join(path, VARIABLES_DIR)))
    else:
        from aia_jax.train import checkpoint  # a training workdir

        tree, step = checkpoint.restore_variables(path, step=step)
        meta = {**meta, "step": step}
    variables = {"params": tree["params"], "batch_stats": tree.get("batch_stats", {})}
    check_variables(path, variables, meta)
    return variables, meta


def check_variables(path: str, variables: Mapping[str, PyTree], meta: Mapping[str, Any]) -> None:
    """Raises `UserError` unless `variables` have the paths and shapes of the network in `meta`.

    Flax ignores variables the network does not use (a TSM run on TSM_CinST_BN variables drops
    the attention without a word) and fails deep inside `apply` on a wrong shape, so a
    `model.json` that disagrees with its variables is caught when they are loaded.
    """
    from aia_jax.convert import release

    try:
        model = create_model(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"{os.path.join(path, MODEL_JSON)}: does not describe a network ({one_line(e)})"
        ) from None
    want = {
        "/".join(k): tuple(v.shape)
        for k, v in traverse_util.flatten_dict(release.variable_shapes(model)).items()
    }
    got = {
        "/".join(k): tuple(np.shape(v))
        for k, v in traverse_util.flatten_dict(
            {c: variables.get(c, {}) for c in ("params", "batch_stats")}
        ).items()
    }
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    reshaped = [
        f"{k} {got[k]} ({want[k]} expected)" for k in want if k in got and got[k] != want[k]
    ]
    if missing or unexpected or reshaped:
        parts = [
            f"{label} {len(keys)}, e.g. {', '.join(keys[:3])}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", reshaped),
            )
            if keys
        ]
        described = ", ".join(
            f"{k} {meta[k]}" for k in ("depth", "width", "num_classes") if k in meta
        )
        raise UserError(
            f"{path}: its variables are not those of the {meta['name']} ({described}) that "
            f"{MODEL_JSON} describes: {'; '.join(parts)}"
        )


def load_for_init(path: str, model_or_meta: Any) -> dict[str, PyTree]:
    """Variables to initialise a training run from (`config.init_from`).

    Args:
      path: a model directory or training workdir (see `load_model`); or a PyTorch file
        (`.pth`, `.pth.tar`, `.safetensors`) holding torchvision ImageNet ResNet weights (the
        release's starting point) or a release checkpoint (`base_model.*` keys), converted on
        the fly by `aia_jax.convert` (`python -m aia_jax.convert` writes the same as a model
        directory, once).
      model_or_meta: the model being trained (a `VideoNet`) or its `model.json` dict; a
        different model name is allowed (e.g. fine-tuning a TSM from a C2D), with a warning.

    Returns:
      `{'params', 'batch_stats'}` (numpy). The trainer copies every tensor whose path and shape
      match its own and keeps its fresh initialisation for the rest (e.g. a classifier with a
      different number of classes).
    """
    if isinstance(model_or_meta, Mapping):
        target, model = dict(model_or_meta), None
    else:
        target, model = meta_from_model(model_or_meta), model_or_meta
    if os.path.isfile(path):
        return _load_torch_for_init(path, model or create_model(target))
    if not os.path.isdir(path):
        raise InputNotFoundError(f"init_from={path!r}: no such model directory, workdir or file")
    variables, meta = load_model(path)
    # A backbone of another depth or width shares some paths and shapes with this one; copying
    # just those would leave the rest random while training goes ahead.
    differ = [
        f"{key} {meta[key]} (this model: {target[key]})"
        for key in ("depth", "width")
        if key in meta and key in target and meta[key] != target[key]
    ]
    if differ:
        raise UserError(
            f"init_from={path!r}: holds a network of another {', '.join(differ)}; "
            "initialise from one of the same depth and width"
        )
    if canonical_name(meta["name"]) != canonical_name(target["name"]):
        logging.warning(
            "init_from: %s holds a %s, initialising a %s from it.",
            path,
            meta["name"],
            target["name"],
        )
    return variables


def _load_torch_for_init(path: str, model: Any) -> dict[str, PyTree]:
    """torchvision ImageNet weights or a release checkpoint → variables of (a variant of) model."""
    from aia_jax import convert
    from aia_jax.convert import release

    state_dict = convert.load_torch_checkpoint(path)
    if not convert.describe_torchvision(state_dict)["release"]:
        return convert.from_torchvision(state_dict, model)
    # A release checkpoint: convert it into the variant of `model` it holds (its attention
    # units, classifier layout and size); the trainer's merge then keeps fresh what differs
    # (attention gates a plain network lacks, a classifier of another size or place).
    found = convert.describe_checkpoint(state_dict)
    placement = release.placement_of(found["units"], prefer=model.placement) or model.placement
    source = model.clone(
        num_classes=found["num_classes"] or model.num_classes,
        placement=placement,
        dropout=release.head_dropout(found["head"], model.dropout),
    )
    if placement != model.placement:
        logging.warning(
            "init_from: %s holds attention placement %r, initialising placement %r from it.",
            path,
            placement,
            model.placement,
        )
    return convert.from_torch(state_dict, source)


def canonical_name(name: str) -> str:
    """The canonical spelling of a model name (unchanged when it is not a valid one)."""
    try:
        from aia_jax.models import parse_name

        return parse_name(name).canonical
    except (ImportError, ValueError):
        return name


# The classifier (`VideoNet`'s `new_fc`, or the backbone's `fc` without dropout) may have
# another number of classes than the network it is initialised from.
CLASSIFIER_PATHS = ("params/new_fc/", "params/base_model/fc/")


def merge_for_init(init: PyTree, loaded: PyTree) -> tuple[PyTree, list[str], list[str]]:
    """Overlays `loaded` onto `init` where paths and shapes agree.

    Returns:
      `(merged, copied, kept)`: the merged tree, and the '/'-joined paths copied from `loaded`
      and those that kept their initial value (missing, or a classifier of another shape).

    Raises:
      ValueError: a tensor outside the classifier has another shape in `loaded` (another
        width, a 2-D kernel for a 3-D one, ...).
    """
    flat_init = traverse_util.flatten_dict(init, sep="/")
    flat_loaded = traverse_util.flatten_dict(loaded, sep="/")
    merged, copied, kept, reshaped = {}, [], [], []
    for key, value in flat_init.items():
        other = flat_loaded.get(key)
        if other is not None and tuple(np.shape(other)) == tuple(value.shape):
            merged[key] = np.asarray(other).astype(value.dtype)
            copied.append(key)
        else:
            if other is not None and not key.startswith(CLASSIFIER_PATHS):
                reshaped.append(f"{key} {tuple(np.shape(other))} (model: {tuple(value.shape)})")
            merged[key] = value
            kept.append(key)
    if reshaped:
        raise ValueError(
            f"{len(reshaped)} tensors outside the classifier have another shape than the "
            f"model's, e.g. {reshaped[0]}"
        )
    return traverse_util.unflatten_dict(merged, sep="/"), copied, kept
