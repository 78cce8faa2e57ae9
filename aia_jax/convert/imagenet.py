"""ImageNet initialisation: torchvision `resnet50`/`resnet101` weights → a network's backbone.

The release starts training from torchvision's ImageNet ResNets: every backbone tensor (stem,
bottleneck convs and BatchNorms, shortcuts) comes from the torchvision state dict (keys
`conv1.weight`, `bn1.*`, `layerS.B.*`, `fc.*`), while the attention units and the classifier
keep their initialisers. `from_torchvision` does the same for any network `models.create`
builds:

- C2D and TSM (all placements): the torchvision tensors map one to one onto `base_model/...`
  (the same table as the release checkpoints, `aia_jax.convert.release`).
- I3D: 2D kernels are inflated by the usual mean inflation — a `kh×kw` kernel becomes
  `kt×kh×kw` by repeating it `kt` times along time and dividing by `kt` (the stem's 7×7 →
  5×7×7, the inflated blocks' 1×1 `conv1` → 3×1×1; `kt = 1` kernels just gain the axis). On a
  clip of identical frames the inflated network then computes what the 2D network computes on
  one frame, *except near the ends of the clip*: the temporal convolutions pad with zeros, so a
  frame closer to an end than the temporal receptive radius (2 for the stem plus 1 per
  inflated block: 11 frames for ResNet-50, 20 for ResNet-101, 5 for the tiny depth-14 net;
  `temporal_radius`) sees part of some kernel against zeros. Frames at least that far from both
  ends are exact by construction; closer ones deviate, strongly at the end frames and less
  with every frame inwards (the padding's share shrinks at each layer). After global
  space-time pooling the I3D logits therefore differ from the 2D ones, the more so the shorter
  the clip; fine-tuning absorbs this, as for every inflated network.

The torchvision classifier `fc` (1000 ImageNet classes) is dropped unless the network has the
same layer: dropout 0 (the classifier then sits at `base_model/fc`, as in the release) and
1000 classes; it is then copied, so that such a C2D network is exactly the ImageNet classifier
applied per frame. Pass `keep_fc=False` to always start the classifier afresh.

Accounting is strict: every backbone variable must be filled with the right shape and every
torchvision key used (BatchNorm `num_batches_tracked` counters and a dropped `fc.*` aside);
otherwise one ConversionError says what disagrees.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aia_jax.convert.release import (
    ConversionError,
    _as_numpy,
    _describe,
    _is_real_float,
    _leaves,
    _mismatch,
    _set,
    leading_dim,
    strip_prefix,
    to_flax_layout,
    to_torch_layout,
    torch_key,
    variable_shapes,
)
from aia_jax.models.video import VideoNet

Variables = dict[str, Any]

_DEPTH_OF_STAGE3 = {6: 50, 23: 101, 1: 14}


def describe_torchvision(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """What a torchvision ResNet state dict says about itself.

    Returns a dict with `depth` (50/101/14 from the number of `layer3` blocks, None if
    unknown), `width` (stem width, from `conv1.weight`; None if absent), `num_classes` (from
    `fc.weight`; None if absent), `bottleneck` (False for the basic-block ResNet-18/34) and
    `release` (True when the keys are a release checkpoint's `base_model.*` / `new_fc.*`).
    """
    keys = strip_prefix(state_dict)
    stage3 = {int(m.group(1)) for k in keys if (m := re.match(r"layer3\.(\d+)\.", k))}
    conv1 = keys.get("conv1.weight")
    fc = keys.get("fc.weight")
    return {
        "depth": _DEPTH_OF_STAGE3.get(len(stage3)),
        "width": None if conv1 is None else leading_dim(conv1, "conv1.weight", 4),
        "num_classes": None if fc is None else leading_dim(fc, "fc.weight", 2),
        "bottleneck": "layer1.0.conv3.weight" in keys or "layer1.0.conv2.weight" not in keys,
        "release": any(k.startswith(("base_model.", "new_fc.")) for k in keys),
    }


def _cross_check(source: Mapping[str, Any], model: VideoNet) -> list[str]:
    found = describe_torchvision(source)
    problems = []
    if not found["bottleneck"]:
        problems.append(
            "architecture: the weights are a basic-block ResNet (resnet18/34); "
            "the network is a bottleneck ResNet"
        )
    elif found["depth"] is not None and found["depth"] != model.depth:
        problems.append(f"depth: weights are ResNet-{found['depth']}, network is {model.depth}")
    if found["width"] is not None and found["width"] != model.width:
        problems.append(f"width: weights have stem width {found['width']}, network {model.width}")
    return problems


def _is_backbone(path: tuple[str, ...]) -> bool:
    """Leaves ImageNet fills: under `base_model`, outside the attention units."""
    return path[0] == "base_model" and not any(p.startswith("eft") for p in path)


def initial_variables(model: VideoNet, seed: int = 0) -> Variables:
    """`model.init` on a small dummy clip, as numpy arrays."""
    clips = jnp.zeros((1, model.num_segments, 32, 32, 3), jnp.float32)
    variables = jax.jit(lambda key: model.init(key, clips, train=False))(jax.random.key(seed))
    return jax.tree_util.tree_map(np.asarray, dict(variables))


def inflate(kernel: np.ndarray, time: int) -> np.ndarray:
    """A Flax 2D kernel `[kh, kw, in, out]` as `[time, kh, kw, in, out]`, repeated and / time."""
    return np.repeat(kernel[None], time, axis=0) / np.asarray(time, kernel.dtype)


def keeps_fc(
    state_dict: Mapping[str, Any], model: VideoNet, shapes: Variables | None = None
) -> bool:
    """Whether `from_torchvision` copies torchvision's `fc` (by default): exactly when the
    network's classifier is `base_model/fc` (dropout 0) with the same shape (1000 classes)."""
    source = strip_prefix(state_dict)
    params = (shapes or variable_shapes(model))["params"]
    fc = params.get("base_model", {}).get("fc")
    if fc is None or "fc.weight" not in source or "fc.bias" not in source:
        return False
    weight = to_flax_layout(_as_numpy(source["fc.weight"]))
    return weight.shape == tuple(fc["kernel"].shape) and np.shape(source["fc.bias"]) == tuple(
        fc["bias"].shape
    )


def from_torchvision(
    state_dict: Mapping[str, Any],
    model: VideoNet,
    *,
    seed: int = 0,
    init: Mapping[str, Any] | None = None,
    keep_fc: bool | None = None,
) -> Variables:
    """Initialises `model` from a torchvision ImageNet ResNet state dict.

    Args:
      state_dict: torchvision keys (`conv1.weight`, `layer1.0.bn1.running_mean`, `fc.bias`, …)
        → arrays (numpy or torch), with or without a `module.` prefix.
      model: any network from `aia_jax.models.create` (C2D, TSM or I3D, any placement) whose
        depth and width match the weights.
      seed: for the initialisers of everything ImageNet does not fill (ignored with `init`).
      init: the variables to start from instead of `model.init` (same tree as the model's).
      keep_fc: copy torchvision's `fc` into `base_model/fc`; None (default) copies it exactly
        when the network has such a layer of the same shape (dropout 0 and 1000 classes).

    Returns:
      `{'params', 'batch_stats'}` as numpy arrays.

    Raises:
      ConversionError: the weights do not fit the backbone (listed: cross-check of depth and
        width, missing, unexpected and wrong-shape keys).
    """
    source = {k: _as_numpy(v) for k, v in strip_prefix(state_dict).items()}
    if describe_torchvision(source)["release"]:
        raise ConversionError(
            "these are the weights of a release network (base_model.* keys), not torchvision "
            "ImageNet weights: convert them with `python -m aia_jax.convert torch2flax`"
        )
    shapes = variable_shapes(model)
    if keep_fc is None:
        keep_fc = keeps_fc(source, model, shapes)
    problems = _cross_check(source, model)
    filled: dict[tuple[str, ...], np.ndarray] = {}
    missing, wrong_shape, used = [], [], set()
    for collection, tree in shapes.items():
        for path, target in _leaves(tree):
            if not _is_backbone(path) or (path[1] == "fc" and not keep_fc):
                continue
            key = torch_key(collection, path[1:])
            if key not in source:
                missing.append(key)
                continue
            used.add(key)
            value = to_flax_layout(source[key])
            if not _is_real_float(value):
                problems.append(f"{key}: a floating-point tensor expected, {value.dtype} found")
                continue
            if value.ndim + 1 == len(target.shape) and value.shape == tuple(target.shape[1:]):
                value = inflate(value, target.shape[0])
            if value.shape != tuple(target.shape):
                # Stated in torchvision's layout (an I3D kernel without its time axis).
                flat = target.shape[1:] if len(target.shape) == 5 else target.shape
                want = tuple(to_torch_layout(np.empty(flat)).shape)
                wrong_shape.append(f"{key} {want} expected, {tuple(source[key].shape)} found")
                continue
            filled[(collection, *path)] = np.array(value, dtype=target.dtype)
    counters = {k[: -len("running_mean")] + "num_batches_tracked" for k in used}
    dropped = {"fc.weight", "fc.bias"} if not keep_fc else set()
    unexpected = sorted(k for k in source if k not in used | counters | dropped)
    if problems or missing or unexpected or wrong_shape:
        parts = _mismatch(problems, missing, unexpected, wrong_shape)
        raise ConversionError(
            f"ImageNet weights do not fit the backbone of {_describe(model)} "
            f"(width {model.width}): " + "; ".join(parts)
        )
    # Initialised only now: a mismatch is reported without waiting for `model.init`.
    variables = jax.tree_util.tree_map(
        np.asarray, dict(init) if init is not None else initial_variables(model, seed)
    )
    for path, value in filled.items():
        _set(variables, path, value)
    return variables


def temporal_radius(model: VideoNet) -> int:
    """How many frames from a clip end an inflated I3D network's output still sees the padding.

    The stem's 5-tap kernel reaches 2 frames, every inflated 3×1×1 `conv1` one more; frames at
    least this far from both ends of a clip of identical frames match the 2D network exactly
    (closer frames may too, to float precision, as the padding's influence decays inwards).
    """
    from aia_jax.models.resnet import STAGE_SIZES, i3d_inflates

    stages = STAGE_SIZES[model.depth]
    return 2 + sum(i3d_inflates(s, b) for s, n in enumerate(stages) for b in range(n))
