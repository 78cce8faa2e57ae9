"""The jitted training and evaluation steps, and the train state they carry.

One `jax.jit` per step with explicit shardings: the state is replicated and donated, the batch
is sharded along the mesh's `data` axis. The model's BatchNorm has no `axis_name`; under jit
its batch mean and variance are means over the global (sharded) batch, which XLA computes with
all-reduces, so a step gives the same result on any number of devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aia_jax.train import mesh as mesh_lib
from aia_jax.train import optim

PyTree = Any
Batch = dict[str, jax.Array]
Normalize = Callable[[jax.Array, Any], jax.Array]


@struct.dataclass
class TrainState:
    """Everything a training step changes; saved whole in every checkpoint."""

    step: jax.Array  # int32 scalar: optimiser steps taken
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    rng: jax.Array  # uint32[2] key; dropout keys are folded from it and the step

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.__dataclass_fields__.values()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{name: d[name] for name in cls.__dataclass_fields__})


def _top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where `labels` is among the `k` highest logits of its row, else 0.0."""
    k = min(k, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    normalize: Normalize,
    compute_dtype: Any = jnp.float32,
    grad_accum_steps: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The (un-jitted) training step: forward, cross-entropy, backward, optimiser update.

    With `grad_accum_steps = a > 1` the global batch is split into `a` micro-batches run one
    after another in a `lax.scan`; gradients are averaged, so one step equals a step on the
    whole batch except for BatchNorm, which, as on a machine that holds only a micro-batch,
    normalises with micro-batch statistics and updates its running statistics after each
    micro-batch (`a` momentum updates per step).

    Args:
      model: a `VideoNet` (or any module with the same `apply` signature).
      tx: from `optim.make_optimizer`.
      normalize: `aia_jax.data.normalize`: uint8 video → normalised `compute_dtype` clips.
      compute_dtype: float32 or bfloat16 activations (parameters stay float32).
      grad_accum_steps: micro-batches per step.

    Returns:
      `step(state, batch) -> (state, metrics)`; metrics are scalar float32: `loss` (mean
      cross-entropy), `top1` (fraction correct), `grad_norm` (global norm before clipping, of
      the gradients clipping sees: partial BN's frozen BatchNorms left out), `param_norm`
      (after the update; non-finite when the update was).
    """

    def forward(params, batch_stats, video, labels, rng):
        clips = normalize(video, compute_dtype)
        variables = {"params": params, "batch_stats": batch_stats}
        logits, updates = model.apply(
            variables, clips, train=True, mutable=["batch_stats"], rngs={"dropout": rng}
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        # Running statistics keep their stored dtype (float32) whatever the compute dtype.
        new_stats = jax.tree.map(
            lambda n, o: n.astype(o.dtype), updates["batch_stats"], batch_stats
        )
        return loss, (new_stats, _top_k_correct(logits, labels, 1).mean())

    grad_fn = jax.value_and_grad(forward, has_aux=True)

    def step(state: TrainState, batch: Batch):
        rng = jax.random.fold_in(state.rng, state.step)
        video, labels = batch["video"], batch["label"]
        if grad_accum_steps == 1:
            (loss, (batch_stats, top1)), grads = grad_fn(
                state.params, state.batch_stats, video, labels, rng
            )
        else:
            a = grad_accum_steps
            # Rows i*a + k form micro-batch k: each device keeps its own rows (no resharding).
            split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // a, a, *x.shape[1:]), 0, 1)  # noqa: E731
            micro = (split(video), split(labels), jnp.arange(a))

            def body(carry, xs):
                grads_sum, batch_stats, loss_sum, top1_sum = carry
                v, y, k = xs
                (loss, (batch_stats, top1)), grads = grad_fn(
                    state.params, batch_stats, v, y, jax.random.fold_in(rng, k)
                )
                grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
                # The metrics are float32, a float64 network's loss too.
                loss_sum = loss_sum + loss.astype(loss_sum.dtype)
                return (grads_sum, batch_stats, loss_sum, top1_sum + top1), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (zeros, state.batch_stats, jnp.float32(0), jnp.float32(0))
            (grads, batch_stats, loss, top1), _ = jax.lax.scan(body, init, micro)
            grads = jax.tree.map(lambda g: g / a, grads)
            loss, top1 = loss / a, top1 / a
        grad_norm = optim.clipped_norm(grads, partial_bn=bool(getattr(model, "partial_bn", False)))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        metrics = {
            "loss": loss.astype(jnp.float32),
            "top1": top1,
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(params),
        }
        return new_state, metrics

    return step


def make_eval_step(
    model: nn.Module,
    *,
    normalize: Normalize,
    compute_dtype: Any = jnp.float32,
    top_k: Sequence[int] = (1, 5),
) -> Callable[[PyTree, Batch], dict[str, jax.Array]]:
    """The (un-jitted) validation step over a batch of `V`-view clips.

    The logits of a video's views are averaged (the release's protocol). Returns sums over the
    valid rows only, so totals do not depend on the batch size or on padding:
    `count`, `loss_sum`, and `top{k}` (number correct) for each k.
    """

    def step(variables: PyTree, batch: Batch):
        video = batch["video"]  # [b, V, T, H, W, 3]
        b, v = video.shape[:2]
        clips = normalize(video.reshape(b * v, *video.shape[2:]), compute_dtype)
        logits = model.apply(variables, clips, train=False)
        logits = logits.reshape(b, v, -1).mean(axis=1)
        labels, valid = batch["label"], batch["valid"].astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        out = {"count": valid.sum(), "loss_sum": (loss * valid).sum()}
        for k in top_k:
            out[f"top{k}"] = (_top_k_correct(logits, labels, k) * valid).sum()
        return out

    return step


def jit_train_step(step_fn, mesh: Mesh, state_sharding: PyTree):
    """Compiles `step_fn` once for `mesh`: state replicated and donated, batch along `data`."""
    repl = mesh_lib.replicated(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, mesh_lib.batch_sharded(mesh)),
        out_shardings=(state_sharding, repl),
        donate_argnums=(0,),
    )


def jit_eval_step(step_fn, mesh: Mesh):
    """Compiles the evaluation step: variables replicated, batch along `data`, sums replicated."""
    repl = mesh_lib.replicated(mesh)
    return jax.jit(step_fn, in_shardings=(repl, mesh_lib.batch_sharded(mesh)), out_shardings=repl)


def state_sharding(abstract_state: TrainState, mesh: Mesh) -> TrainState:
    """Replicated sharding for every leaf of the state (data parallelism)."""
    repl = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda _: repl, abstract_state)
