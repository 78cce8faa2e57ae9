"""The release's state-dict keys ⇄ Flax variables of `aia_jax.models.create` networks.

The Flax modules are named after the release's modules (docs/design.md), so the mapping is a
table applied to every leaf: module path `layer1_0` ↔ `layer1.0`, `downsample_conv`/`_bn` ↔
`downsample.0`/`.1`; leaves `kernel`/`scale`/`bias`/`mean`/`var` ↔ `weight`/`weight`/`bias`/
`running_mean`/`running_var`; kernels transposed from torch's out-channels-first layouts.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from aia_jax.errors import UserError
from aia_jax.models.video import VideoNet

Variables = dict[str, Any]

_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# torch layout → Flax layout, by rank: Dense (out, in) → (in, out); Conv2d OIHW → HWIO;
# Conv3d (the I3D convs and the gates' 2→1 convs) OIDHW → DHWIO.
_TO_FLAX_AXES = {2: (1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}


class ConversionError(UserError):
    """A checkpoint does not match the network it is converted to or from."""


def _module_to_torch(name: str) -> str:
    name = re.sub(r"^layer(\d+)_(\d+)$", r"layer\1.\2", name)
    return {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(name, name)


def torch_key(collection: str, path: tuple[str, ...]) -> str:
    """The release key of the Flax leaf `variables[collection][path[0]]…[path[-1]]`."""
    *modules, leaf = path
    return ".".join([*(_module_to_torch(m) for m in modules), _LEAF_TO_TORCH[collection, leaf]])


def to_flax_layout(array: np.ndarray) -> np.ndarray:
    """A torch weight in the Flax layout (identity for vectors)."""
    axes = _TO_FLAX_AXES.get(array.ndim)
    return array if axes is None else np.transpose(array, axes)


def to_torch_layout(array: np.ndarray) -> np.ndarray:
    """The inverse of `to_flax_layout`."""
    axes = _TO_FLAX_AXES.get(array.ndim)
    return array if axes is None else np.transpose(array, np.argsort(axes))


def variable_shapes(model: VideoNet) -> Variables:
    """Shapes (`jax.ShapeDtypeStruct`) of the model's variables, without allocating them.

    Tracing a ResNet-50's `init` takes seconds and a conversion needs the shapes more than once
    (to check the keys each way), so they are remembered per model (modules are frozen
    dataclasses: equal fields, equal shapes); each call returns its own copy of the tree.
    """
    try:
        shapes = _traced_shapes(model)
    except TypeError:  # a module with an unhashable field: trace it every time
        shapes = _traced_shapes.__wrapped__(model)
    return jax.tree.map(lambda s: s, shapes)


@functools.lru_cache(maxsize=16)
def _traced_shapes(model: VideoNet) -> Variables:
    clips = jnp.zeros((1, model.num_segments, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), clips, train=False))
    return unfreeze(shapes)


def _leaves(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
    for name, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, (*prefix, name))
        else:
            yield (*prefix, name), value


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor handed in directly
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _is_real_float(value: np.ndarray) -> bool:
    """Whether `value` holds real floating-point numbers (bfloat16 is not a numpy `floating`)."""
    return value.dtype.kind not in "biucOSUM"


def leading_dim(value: Any, key: str, rank: int) -> int:
    """The first dimension of `value`, a checkpoint's `key`, which must have `rank` dimensions.

    Raises:
      ConversionError: naming `key`, when its shape has another number of dimensions.
    """
    shape = tuple(np.shape(_as_numpy(value)))
    if len(shape) != rank:
        raise ConversionError(f"{key}: a {rank}-D tensor expected, shape {shape} found")
    return int(shape[0])


def strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drops DataParallel's `module.` prefix where every key has it."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def describe_checkpoint(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """What a release state dict says about its network: depth, classes, attention units.

    Returns a dict with `depth` (50/101/… from the stage-3 block count, None if unknown),
    `num_classes`, `head` ('new_fc' or 'fc'), and `units`: per unit slot (`eft`, `eft1`, `eft2`)
    the sorted gate letters found in the first block.
    """
    keys = strip_prefix(state_dict)
    stage3 = {int(m.group(1)) for k in keys if (m := re.match(r"base_model\.layer3\.(\d+)\.", k))}
    depth = {6: 50, 23: 101, 1: 14}.get(len(stage3)) if stage3 else None
    head = "new_fc" if "new_fc.weight" in keys else "fc" if "base_model.fc.weight" in keys else None
    fc = keys.get("new_fc.weight", keys.get("base_model.fc.weight"))
    units: dict[str, list[str]] = {}
    for k in keys:
        m = re.match(r"base_model\.layer1\.0\.(eft\d?)\.([CTHW])_conv\.weight$", k)
        if m:
            units.setdefault(m.group(1), []).append(m.group(2))
    return {
        "depth": depth,
        "num_classes": None if fc is None else leading_dim(fc, f"{head}.weight", 2),
        "head": head,
        "units": {slot: sorted(g) for slot, g in sorted(units.items())},
    }


def _expected_units(model: VideoNet) -> dict[str, list[str]]:
    return _placement_units(model.placement)


def _placement_units(placement: str) -> dict[str, list[str]]:
    from aia_jax.models.attention import PLACEMENTS, UNIT_GATES

    units, _ = PLACEMENTS[placement]
    slots = ["eft"] if len(units) == 1 else ["eft1", "eft2"][: len(units)]
    return {slot: sorted(UNIT_GATES[u]) for slot, u in zip(slots, units, strict=False)}


def head_dropout(head: str | None, dropout: float) -> float:
    """A dropout whose classifier sits where a checkpoint's `head` ('fc', 'new_fc' or None) is.

    The release puts the classifier at `base_model.fc` only when dropout is 0, else at `new_fc`
    (with 0.5, the release's value, in place of a 0); `dropout` is kept where it fits.
    """
    if head == "fc":
        return 0.0
    if head == "new_fc" and dropout == 0:
        return 0.5
    return dropout


def placement_of(units: Mapping[str, list[str]], prefer: str = "none") -> str | None:
    """A placement with the attention `units` that `describe_checkpoint` found, or None.

    Placements with the same units (CinST and STinC, …) have the same variables and cannot be
    told apart by the keys: `prefer` is returned when it is one of them.
    """
    from aia_jax.models.attention import PLACEMENTS

    units = dict(units)
    matching = [p for p in PLACEMENTS if _placement_units(p) == units]
    return prefer if prefer in matching else next(iter(matching), None)


def _cross_check(state_dict: Mapping[str, Any], model: VideoNet) -> list[str]:
    """Disagreements between the checkpoint's contents and the network the user named."""
    found = describe_checkpoint(state_dict)
    problems = []
    if found["depth"] is not None and found["depth"] != model.depth:
        problems.append(f"depth: checkpoint has ResNet-{found['depth']}, model is {model.depth}")
    conv1 = np.shape(_as_numpy(strip_prefix(state_dict).get("base_model.conv1.weight", ())))
    width = conv1[0] if len(conv1) == 4 else None  # another rank is named as a wrong shape
    if width is not None and width != model.width:
        problems.append(f"width: checkpoint has stem width {width}, model has {model.width}")
    if found["num_classes"] is not None and found["num_classes"] != model.num_classes:
        problems.append(
            f"classes: checkpoint has {found['num_classes']}, model has {model.num_classes}"
        )
    want_head = "fc" if model.dropout == 0 else "new_fc"
    if found["head"] is not None and found["head"] != want_head:
        problems.append(
            f"classifier: checkpoint has {found['head']}, a dropout-{model.dropout} model has "
            f"{want_head} (the release puts it at base_model.fc only when dropout is 0)"
        )
    if found["units"] != _expected_units(model):
        problems.append(
            f"attention: checkpoint has units {found['units'] or 'none'}, placement "
            f"{model.placement!r} has {_expected_units(model) or 'none'}"
        )
    return problems


def from_torch(state_dict: Mapping[str, Any], model: VideoNet) -> Variables:
    """Converts a release state dict to `{'params', 'batch_stats'}` of `model`.

    Every source key must be consumed and every target leaf filled with the right shape;
    otherwise one ConversionError lists what disagrees (the named network first, then the
    missing, unexpected and wrong-shape keys). `num_batches_tracked` entries are accepted and
    dropped (Flax's BatchNorm keeps no counter). Note that TSM and C2D checkpoints have the same
    keys, and so have placements with the same units (CinST / STinC; C2ST / CplusST;
    CinST2STinC / STinC2CinST / STinCplusCinST): those come from the name the user gives.

    Args:
      state_dict: key → array (numpy or torch), with or without the `module.` prefix.
      model: the network from `aia_jax.models.create`.
    """
    source = strip_prefix(state_dict)
    problems = _cross_check(source, model)
    variables: Variables = {}
    missing, wrong_shape, wrong_dtype, used = [], [], [], set()
    for collection, tree in variable_shapes(model).items():
        for path, target in _leaves(tree):
            key = torch_key(collection, path)
            if key not in source:
                missing.append(key)
                continue
            used.add(key)
            value = to_flax_layout(_as_numpy(source[key]))
            if not _is_real_float(value):
                wrong_dtype.append(f"{key}: a floating-point tensor expected, {value.dtype} found")
                continue
            if value.shape != tuple(target.shape):
                wrong_shape.append(
                    f"{key} {tuple(to_torch_layout(np.empty(target.shape)).shape)} expected, "
                    f"{tuple(_as_numpy(source[key]).shape)} found"
                )
                continue
            # A copy: torch tensors and numpy views must not alias the new variables.
            _set(variables, (collection, *path), jnp.array(value, dtype=target.dtype, copy=True))
    bn_counters = {k[: -len(".running_mean")] + ".num_batches_tracked" for k in used}
    unexpected = sorted(k for k in source if k not in used and k not in bn_counters)
    if missing or unexpected or wrong_shape or wrong_dtype:
        parts = _mismatch(problems + wrong_dtype, missing, unexpected, wrong_shape)
        raise ConversionError(f"checkpoint does not fit {_describe(model)}: " + "; ".join(parts))
    return variables


def batch_counters(state_dict: Mapping[str, Any]) -> dict[str, int]:
    """The BatchNorm `num_batches_tracked` values of a release state dict (keys without `module.`).

    Flax keeps no such counter; hand the result to `to_torch` to write the same values back.
    """
    return {
        k: int(np.asarray(_as_numpy(v)).reshape(-1)[0])
        for k, v in strip_prefix(state_dict).items()
        if k.endswith(".num_batches_tracked") and np.size(_as_numpy(v)) == 1
    }


# Rank of a key component among its siblings in the release's registration order (the order of
# `state_dict()` and of official_keys/): stem, stages, fc; conv/bn pairs in a block; gates C, T,
# H, W; BatchNorm leaves as torch registers them. Numbers sort numerically, unknown names last.
_ORDER = {
    name: i
    for i, name in enumerate(
        "base_model new_fc conv1 bn1 conv2 bn2 conv3 bn3 layer1 layer2 layer3 layer4 fc "
        "C_conv C_bn T_conv T_bn H_conv H_bn W_conv W_bn "
        "weight bias running_mean running_var num_batches_tracked".split()
    )
}
# Within a bottleneck the release's C2D registers the attention before `downsample`, its TSM
# after it (official_keys/ shows both); I3D is not a release network and follows C2D.
_BLOCK_TAIL = {
    "TSM": ("downsample", "eft", "eft1", "eft2"),
    "default": ("eft", "eft1", "eft2", "downsample"),
}


def release_order(keys: list[str], form: str) -> list[str]:
    """`keys` (with or without `module.`) sorted into the release's `state_dict()` order."""
    tail = _BLOCK_TAIL.get(form, _BLOCK_TAIL["default"])
    ranks = {**_ORDER, **{name: 100 + i for i, name in enumerate(tail)}}

    def rank(key: str) -> tuple[tuple[int, int, str], ...]:
        parts = key.removeprefix("module.").split(".")
        return tuple(
            (0, int(p), "") if p.isdigit() else (0, ranks[p], "") if p in ranks else (1, 0, p)
            for p in parts
        )

    return sorted(keys, key=rank)


def to_torch(
    variables: Mapping[str, Any],
    model: VideoNet,
    *,
    num_batches_tracked: int | Mapping[str, int] = 0,
) -> dict[str, np.ndarray]:
    """The release's state dict (with the `module.` prefix of DataParallel) of `variables`.

    Keys come out in the release's `state_dict()` order, with exactly the release's keys, shapes
    and dtypes (float32 tensors, BatchNorm `num_batches_tracked` int64 scalars).

    Args:
      variables: `{'params', 'batch_stats'}` of `model`.
      model: the network from `aia_jax.models.create`.
      num_batches_tracked: the BatchNorm counters: one value for all, or per key (as returned
        by `batch_counters`, with or without `module.`; keys not listed get 0).
    """
    per_key = isinstance(num_batches_tracked, Mapping)
    counters = (
        {k.removeprefix("module."): int(v) for k, v in num_batches_tracked.items()}
        if per_key
        else {}
    )
    out: dict[str, np.ndarray] = {}
    for collection in ("params", "batch_stats"):
        for path, value in _leaves(variables.get(collection, {})):
            key = "module." + torch_key(collection, path)
            out[key] = np.ascontiguousarray(to_torch_layout(np.asarray(value, dtype=np.float32)))
            if collection == "batch_stats" and path[-1] == "mean":
                counter = key[: -len("running_mean")] + "num_batches_tracked"
                value = (
                    counters.get(counter.removeprefix("module."), 0)
                    if per_key
                    else int(num_batches_tracked)
                )
                out[counter] = np.array(value, dtype=np.int64)
    expected = {
        "module." + torch_key(c, p)
        for c, t in variable_shapes(model).items()
        for p, _ in _leaves(t)
    }
    got = {k for k in out if not k.endswith("num_batches_tracked")}
    if got != expected:
        raise ConversionError(
            f"variables do not fit {_describe(model)}: missing {sorted(expected - got)[:8]}, "
            f"unexpected {sorted(got - expected)[:8]}"
        )
    return {k: out[k] for k in release_order(list(out), model.form)}


def _mismatch(
    problems: list[str], missing: list[str], unexpected: list[str], wrong_shape: list[str]
) -> list[str]:
    """The parts of a does-not-fit error: `problems`, then up to 8 keys of each kind."""
    parts = problems[:]
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", wrong_shape),
    ):
        if keys:
            shown = ", ".join(keys[:8]) + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")
            parts.append(f"{label}: {shown}")
    return parts


def _describe(model: VideoNet) -> str:
    name = model.form if model.placement == "none" else f"{model.form}_{model.placement}_BN"
    return f"{name} ResNet-{model.depth} with {model.num_classes} classes"
