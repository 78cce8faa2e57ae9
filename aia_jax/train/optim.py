"""The release's optimiser in optax: SGD with momentum and its three parameter groups.

Groups (as in the release): conv/dense kernels lr×1 with weight decay; biases lr×2 without decay;
BatchNorm scale/shift lr×1 without decay. With partial BN the backbone's block BatchNorms are
frozen (no update, and not counted in the gradient-clipping norm, like a torch parameter with
`requires_grad=False`); the model itself runs them on their running statistics
(`models.create(..., partial_bn=True)`).

The update matches torch.optim.SGD (dampening 0, no Nesterov): weight decay is added to the
clipped gradient, the momentum buffer accumulates gradients, and the learning rate of the step
multiplies the buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from aia_jax.errors import UserError

PyTree = Any
Schedule = Callable[[jax.Array | int], jax.Array]

GROUPS = ("weight", "bias", "bn", "frozen")
LR_MULT = {"weight": 1.0, "bias": 2.0, "bn": 1.0}
DECAY = {"weight": True, "bias": False, "bn": False}


def is_frozen_bn(module_path: Sequence[str]) -> bool:
    """Whether partial BN freezes the BatchNorm at `module_path` (names from the params root).

    The model decides (`models.frozen_by_partial_bn`): every block BatchNorm of the backbone;
    the stem's `bn1` and the attention gates' BatchNorms (new layers) stay trainable.
    """
    from aia_jax.models import frozen_by_partial_bn

    return frozen_by_partial_bn(tuple(module_path))


def param_labels(params: PyTree, *, partial_bn: bool = False) -> PyTree:
    """Labels every parameter with its group: 'weight', 'bias', 'bn' or 'frozen'.

    A module holding a `scale` is a normalisation layer; a `bias` beside a `kernel` belongs to
    a convolution or dense layer. Works on arrays and on `jax.ShapeDtypeStruct`s alike.
    """
    flat = traverse_util.flatten_dict(params)
    modules: dict[tuple[str, ...], set[str]] = {}
    for path in flat:
        modules.setdefault(path[:-1], set()).add(path[-1])

    def label(path: tuple[str, ...]) -> str:
        module, leaf = path[:-1], path[-1]
        is_norm = "scale" in modules[module] or ("kernel" not in modules[module] and leaf == "bias")
        if is_norm:
            return "frozen" if partial_bn and is_frozen_bn(module) else "bn"
        return "bias" if leaf == "bias" else "weight"

    return traverse_util.unflatten_dict({path: label(path) for path in flat})


def scaled_learning_rate(lr: float, reference_batch_size: int, global_batch_size: int) -> float:
    """The linear scaling rule: `lr` is given for `reference_batch_size` clips per step."""
    return lr * global_batch_size / reference_batch_size


def make_schedule(
    cfg: Mapping[str, Any], *, steps_per_epoch: int, num_epochs: float, global_batch_size: int
) -> Schedule:
    """The learning rate of each optimiser step (before the per-group multipliers).

    Args:
      cfg: the `optimizer` config block (`lr`, `reference_batch_size`, `schedule`, `lr_steps`,
        `lr_decay`, `warmup_epochs`).
      steps_per_epoch: optimiser steps per epoch.
      num_epochs: length of the run (the cosine schedule reaches 0 at its end).
      global_batch_size: clips per optimiser step, for the linear scaling rule.

    Returns:
      `schedule(step) -> lr`. 'step' multiplies the scaled rate by `lr_decay` at each epoch in
      `lr_steps`; 'cosine' follows half a cosine from it to 0 over the run (per step, where the
      release steps once per epoch); a linear warm-up over `warmup_epochs` multiplies either.
    """
    base = scaled_learning_rate(cfg["lr"], cfg["reference_batch_size"], global_batch_size)
    total = max(1, round(num_epochs * steps_per_epoch))
    kind = cfg.get("schedule", "step")
    if kind == "step":
        decay = cfg.get("lr_decay", 0.1)
        boundaries = {round(e * steps_per_epoch): decay for e in cfg.get("lr_steps", ())}
        main = optax.piecewise_constant_schedule(base, boundaries)
    elif kind == "cosine":
        main = optax.cosine_decay_schedule(base, total)
    elif kind == "constant":
        main = optax.constant_schedule(base)
    else:
        raise UserError(
            f"config.optimizer.schedule {kind!r}: expected 'step', 'cosine' or 'constant'"
        )
    warmup = round(cfg.get("warmup_epochs", 0) * steps_per_epoch)
    if warmup <= 0:
        return main

    def schedule(step):
        # Step 0 already moves (lr/warmup), as a warm-up of `warmup` steps should end at `base`.
        return main(step) * jnp.minimum(1.0, (step + 1) / warmup)

    return schedule


def _sgd(schedule: Schedule, lr_mult: float, weight_decay: float, momentum: float):
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.trace(decay=momentum))
    parts.append(optax.scale_by_learning_rate(lambda step: lr_mult * schedule(step)))
    return optax.chain(*parts)


def clipped_norm(grads: PyTree, *, partial_bn: bool = False) -> jax.Array:
    """The global norm `make_optimizer`'s clipping sees: partial BN's frozen BatchNorms, whose
    gradients it zeroes first, left out."""
    if not partial_bn:
        return optax.tree.norm(grads)
    labels = jax.tree.leaves(param_labels(grads, partial_bn=True))
    used = [g for g, label in zip(jax.tree.leaves(grads), labels) if label != "frozen"]
    return optax.tree.norm(used)


def make_optimizer(
    cfg: Mapping[str, Any], params: PyTree, schedule: Schedule
) -> optax.GradientTransformation:
    """SGD with momentum, per-group learning rates and decay, clipping and partial BN.

    Args:
      cfg: the `optimizer` config block (`momentum`, `weight_decay`, `clip_grad_norm`,
        `partial_bn`).
      params: the parameter tree (or its shapes), to label the groups.
      schedule: from `make_schedule`.
    """
    labels = param_labels(params, partial_bn=cfg.get("partial_bn", False))
    momentum, wd = cfg.get("momentum", 0.9), cfg.get("weight_decay", 1e-4)
    groups = {
        name: _sgd(schedule, LR_MULT[name], wd if DECAY[name] else 0.0, momentum)
        for name in ("weight", "bias", "bn")
    }
    groups["frozen"] = optax.set_to_zero()
    frozen = jax.tree.map(lambda label: label == "frozen", labels)
    parts = [optax.masked(optax.set_to_zero(), frozen)]  # no gradient, like requires_grad=False
    if cfg.get("clip_grad_norm"):
        parts.append(optax.clip_by_global_norm(cfg["clip_grad_norm"]))
    parts.append(optax.multi_transform(groups, labels))
    return optax.chain(*parts)


def group_sizes(params: PyTree, *, partial_bn: bool = False) -> dict[str, int]:
    """Number of parameters in each group, for the start-up log."""
    sizes = dict.fromkeys(GROUPS, 0)
    labels = param_labels(params, partial_bn=partial_bn)
    for label, p in zip(jax.tree.leaves(labels), jax.tree.leaves(params)):
        sizes[label] += int(p.size)
    return sizes
