"""Bottleneck ResNets (torchvision v1.5 layout) in three temporal forms: C2D, TSM and I3D.

- `C2D` (TSN): a 2D ResNet applied to every frame; the map is `[B*T, H, W, C]`.
- `TSM`: the same with the temporal shift of the release on the residual branch ('blockres') or
  on the block input ('block').
- `I3D`: a 3D ResNet in the usual I3D/SlowOnly convention — 5×7×7 stem, 3×1×1 temporal kernels
  on `conv1` of the inflated blocks, no temporal down-sampling (every block keeps T frames); the
  map is `[B, T, H, W, C]`.

The attention of the release sits after `bn2` and before its ReLU in the blocks that
`carries_attention` selects; it always sees the map as `[b, t, h, w, c]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aia_jax.models import fused
from aia_jax.models.attention import DEFAULT_IMPL, apply_placement
from aia_jax.models.layers import BatchNorm, Conv, max_pool

Dtype = Any

STAGE_SIZES = {14: (1, 1, 1, 1), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
TEMPORAL_FORMS = ("C2D", "TSM", "I3D")
SHIFT_PLACES = ("blockres", "block")

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def carries_attention(block: int, num_blocks: int) -> bool:
    """The release's rule for which blocks get the attention (and, for TSM, the shift).

    Block 0 always; block i >= 1 when i % n_round == 0, with n_round = 2 in a stage of at least
    23 blocks (ResNet-101's third stage) and 1 otherwise.
    """
    n_round = 2 if num_blocks >= 23 else 1
    return block % n_round == 0


def i3d_inflates(stage: int, block: int) -> bool:
    """Whether `conv1` of a block is inflated to 3×1×1 (I3D ResNet-50's pattern, any depth).

    Stage 1: every block; stages 2 and 3: every second block from the first; stage 4: the
    odd blocks — ((1, 1, 1), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 1, 0)) for ResNet-50.
    """
    if stage == 0:
        return True
    if stage == 3:
        return block % 2 == 1
    return block % 2 == 0


def frozen_by_partial_bn(path: Sequence[str]) -> bool:
    """Whether partial BN freezes the parameter at `path` (module names from the params root).

    That is the scale and bias of every block BatchNorm of the backbone; the stem's `bn1` and
    the attention's gate BatchNorms stay trainable.
    """
    return (
        len(path) >= 3
        and path[0] == "base_model"
        and path[1].startswith("layer")
        and path[2] in ("bn1", "bn2", "bn3", "downsample_bn")
    )


def temporal_shift(x: jax.Array, fold_div: int = 8) -> jax.Array:
    """The release's temporal shift of a `[b, t, h, w, c]` map.

    Channels [0, fold) take the next frame's value, [fold, 2·fold) the previous frame's, the rest
    stay; the frame missing at each end of the clip is zero. fold = c // fold_div.
    """
    if x.ndim != 5:
        raise ValueError(
            f"temporal_shift: a map [b, t, h, w, c] expected, got {x.shape} "
            "(reshape a [B*T, H, W, C] frame map to clips first)"
        )
    if fold_div < 1:
        raise ValueError(f"temporal_shift: fold_div must be at least 1, got {fold_div}")
    fold = x.shape[-1] // fold_div
    if fold == 0:
        return x
    if x.shape[-1] % fold:
        return _shift(x, fold, axis=x.ndim - 1)
    # Joined along the channel axis, the three parts make XLA:CPU choose each element's source
    # inside its innermost loop; viewed as [groups, fold] channels, they join along the groups
    # and each group copies as one contiguous run. A TSM ResNet-50's inference took ~5 % less
    # time, its training step ~3 % (bench/RESULTS.md §2, 2026-12-05).
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // fold, fold)
    return _shift(groups, 1, axis=groups.ndim - 2).reshape(x.shape)


def _shift(x: jax.Array, fold: int, axis: int) -> jax.Array:
    """The shift of `fold` channels each way, the channels along `axis` and time along axis 1."""
    t = x.shape[1]

    def frames(v: jax.Array, start: int, stop: int, pad: tuple[int, int]) -> jax.Array:
        widths = [(0, 0)] * v.ndim
        widths[1] = pad
        return jnp.pad(jax.lax.slice_in_dim(v, start, stop, axis=1), widths)

    # One split, not three slices: the gradient of a split is a concatenate, where the gradient
    # of each slice is a zero-padded full map, and XLA adds the three (2–4× slower alone,
    # bench/RESULTS.md §2, 2026-12-06).
    to_next, to_prev, kept = jax.lax.split(x, (fold, fold, x.shape[axis] - 2 * fold), axis=axis)
    from_next = frames(to_next, 1, t, (0, 1))
    from_prev = frames(to_prev, 0, t - 1, (1, 0))
    return jnp.concatenate([from_next, from_prev, kept], axis=axis)


class Bottleneck(nn.Module):
    """Bottleneck block: conv1 1×1, conv2 3×3 (stride), [attention], conv3 1×1, + shortcut.

    Attributes:
      planes: width of conv1/conv2; the block outputs 4 × planes channels.
      strides: spatial stride of conv2 and of the projection shortcut.
      downsample: whether the shortcut is a 1×1 projection (`downsample_conv`/`downsample_bn`).
      form: 'C2D', 'TSM' or 'I3D'.
      num_segments: frames per clip (the 2D forms fold them into the batch axis).
      attention: placement name for this block ('none' for plain blocks).
      shift: whether this block shifts (TSM only); `shift_place` is 'blockres' or 'block'.
      inflate: I3D only, whether conv1 is 3×1×1.
      partial_bn: run the block's BatchNorms on their running statistics even in training
        (TSN's partial BN; the trainer also freezes their scale and bias).
      attention_impl: how the attention is computed, 'fused' or 'xla' (same parameters).
    """

    planes: int
    strides: int = 1
    downsample: bool = False
    form: str = "C2D"
    num_segments: int = 8
    attention: str = "none"
    shift: bool = False
    shift_place: str = "blockres"
    inflate: bool = False
    partial_bn: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = DEFAULT_IMPL

    def _to_clips(self, x: jax.Array) -> jax.Array:
        if self.form == "I3D":
            return x
        return x.reshape(x.shape[0] // self.num_segments, self.num_segments, *x.shape[1:])

    def _from_clips(self, x: jax.Array, like: jax.Array) -> jax.Array:
        return x if self.form == "I3D" else x.reshape(like.shape)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if self.form not in TEMPORAL_FORMS:
            raise ValueError(f"form must be one of {TEMPORAL_FORMS}, got {self.form!r}")
        check_shift_place(self.shift_place)
        _check_input(
            x,
            self.form,
            self.num_segments,
            clips=self.shift or self.attention != "none",
            who="Bottleneck",
        )
        if not self.downsample and x.shape[-1] != 4 * self.planes:
            raise ValueError(
                f"Bottleneck(planes={self.planes}) without downsample needs "
                f"{4 * self.planes} input channels (its output width), {x.shape[-1]} given"
            )
        three_d = self.form == "I3D"
        conv = partial(
            Conv,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=conv_init,
        )
        norm = partial(
            BatchNorm,
            use_running_average=not train or self.partial_bn,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        # Kernel shapes and explicit (torch-style) padding of the three convolutions.
        if three_d:
            kt = 3 if self.inflate else 1
            k1, p1 = (kt, 1, 1), ((kt // 2,) * 2, (0, 0), (0, 0))
            k2, p2 = (1, 3, 3), ((0, 0), (1, 1), (1, 1))
            k3, s2 = (1, 1, 1), (1, self.strides, self.strides)
        else:
            k1, p1 = (1, 1), ((0, 0), (0, 0))
            k2, p2 = (3, 3), ((1, 1), (1, 1))
            k3, s2 = (1, 1), (self.strides, self.strides)

        if self.shift and self.shift_place == "block":
            x = self._from_clips(temporal_shift(self._to_clips(x)), x)
        residual = x
        if self.shift and self.shift_place == "blockres":
            x = self._from_clips(temporal_shift(self._to_clips(x)), x)

        y = conv(self.planes, k1, padding=p1, name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv(self.planes, k2, strides=s2, padding=p2, name="conv2")(y)
        y = norm(name="bn2")(y)
        if self.attention != "none":
            clips = apply_placement(
                self.attention,
                self._to_clips(y),
                train=train,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                impl=self.attention_impl,
            )
            y = self._from_clips(clips, y)
        y = nn.relu(y)
        y = conv(self.planes * 4, k3, padding="VALID", name="conv3")(y)
        y = norm(name="bn3")(y)

        if self.downsample:
            residual = conv(
                self.planes * 4, k3, strides=s2, padding="VALID", name="downsample_conv"
            )(residual)
            residual = norm(name="downsample_bn")(residual)
        return nn.relu(y + residual)


def _run_block(block: Bottleneck, x: jax.Array, *, train: bool, remat: bool) -> jax.Array:
    """`block(x, train=train)`; with `remat`, its activations recomputed in the backward pass.

    Not `nn.remat`/`jax.checkpoint`: XLA:CPU drops their optimization barrier and merges the
    recomputation back into the forward pass (a ResNet-50 step kept 79 % of its temporaries,
    bench/RESULTS.md §4), and nothing ties it to the backward pass on any backend. Here the
    forward pass keeps only the block's input and variables (`jax.custom_vjp` through
    `nn.custom_vjp`), and the backward pass reruns the block from a copy of that input which
    depends on the output's cotangent (`fused.materialize`): XLA can neither merge nor hoist it.
    """
    if not remat:
        return block(x, train=train)
    unbound = block.clone(parent=None)

    def forward(module: Bottleneck, v: jax.Array):
        return module(v, train=train), (module.variables, v)

    def backward(residuals, dy: jax.Array):
        variables, v = residuals
        v = fused.materialize(v, dy)

        def rerun(params, v):
            out, _ = unbound.apply({**variables, "params": params}, v, train=train, mutable=True)
            return out

        _, vjp = jax.vjp(rerun, variables["params"], v)
        d_params, dx = vjp(dy)
        return {"params": d_params}, dx

    run = nn.custom_vjp(lambda module, v: module(v, train=train), forward, backward)
    return run(block, x)


def check_shift_place(shift_place: str) -> None:
    """Raises `ValueError` unless `shift_place` is one of `SHIFT_PLACES`."""
    if shift_place not in SHIFT_PLACES:
        raise ValueError(f"shift_place must be 'blockres' or 'block', got {shift_place!r}")


def _check_input(
    x: jax.Array, form: str, num_segments: int, *, clips: bool, who: str = "ResNet"
) -> None:
    """Names a wrongly shaped input here, rather than letting a reshape deep inside fail."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        what = "normalised frames" if who == "ResNet" else "map"
        raise ValueError(f"{who}(form={form!r}): a floating-point {what} expected, got {x.dtype}")
    if form == "I3D":
        if x.ndim != 5:
            raise ValueError(f"{who}(form='I3D'): clips [B, T, H, W, C] expected, got {x.shape}")
        return
    if x.ndim != 4:
        raise ValueError(f"{who}(form={form!r}): frames [B*T, H, W, C] expected, got {x.shape}")
    if clips and x.shape[0] % num_segments:
        raise ValueError(
            f"{who}(form={form!r}): {x.shape[0]} frames are not whole clips of "
            f"num_segments={num_segments}"
        )


class ResNet(nn.Module):
    """The release's `base_model`: stem, four bottleneck stages, global average pool.

    Attributes:
      depth: 50 or 101 (the release), or 14 — one block per stage, for tests and CPU runs.
      width: stem width (64 in the release); stage s has width·2^s planes.
      form: 'C2D', 'TSM' or 'I3D'.
      attention: the placement applied in the selected blocks.
      num_classes: when set, the torchvision `fc` layer is applied here (the release does this
        when dropout is 0); otherwise the pooled features are returned.
      fc_init: that layer's kernel initialiser (the release's TSN head: normal(0, 0.001)).
      partial_bn: TSN's partial BN — every backbone BatchNorm but the stem's `bn1` runs on its
        running statistics in training. The attention's gate BatchNorms are not affected (the
        release freezes `BatchNorm2d` layers only; the gates' are 3D).
      remat: recompute each bottleneck's activations in the backward pass instead of keeping
        them (as mmaction2's `with_cp`; see `_run_block`): a training step keeps only the
        blocks' inputs, for about one more forward pass of compute. Same parameters, same
        values; reverse mode only (`jax.jvp` needs remat off); no effect without a gradient.
    """

    depth: int = 50
    width: int = 64
    form: str = "C2D"
    num_segments: int = 8
    attention: str = "none"
    shift_place: str = "blockres"
    num_classes: int | None = None
    fc_init: Callable[..., jax.Array] = nn.linear.default_kernel_init
    partial_bn: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = DEFAULT_IMPL
    remat: bool = False

    @property
    def stage_sizes(self) -> Sequence[int]:
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"depth must be one of {sorted(STAGE_SIZES)}, got {self.depth}")
        return STAGE_SIZES[self.depth]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Maps frames `[B*T, H, W, 3]` (2D forms) or clips `[B, T, H, W, 3]` (I3D).

        Returns pooled features `[B*T, C]` / `[B, C]`, or logits when `num_classes` is set.
        """
        if self.form not in TEMPORAL_FORMS:
            raise ValueError(f"form must be one of {TEMPORAL_FORMS}, got {self.form!r}")
        check_shift_place(self.shift_place)
        three_d = self.form == "I3D"
        _check_input(
            x, self.form, self.num_segments, clips=self.form != "C2D" or self.attention != "none"
        )
        x = x.astype(self.dtype)
        if three_d:
            stem = dict(kernel_size=(5, 7, 7), strides=(1, 2, 2), padding=((2, 2), (3, 3), (3, 3)))
        else:
            stem = dict(kernel_size=(7, 7), strides=(2, 2), padding=((3, 3), (3, 3)))
        x = Conv(
            self.width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=conv_init,
            name="conv1",
            **stem,
        )(x)
        x = BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="bn1",
        )(x)
        x = nn.relu(x)
        if three_d:
            x = max_pool(x, (1, 3, 3), (1, 2, 2), ((0, 0), (1, 1), (1, 1)))
        else:
            x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))

        # Initialisation only creates the variables: there is no gradient to save memory in.
        remat = self.remat and not self.is_initializing()
        in_channels = self.width
        for stage, num_blocks in enumerate(self.stage_sizes):
            planes = self.width * 2**stage
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                selected = carries_attention(block, num_blocks)
                block_module = Bottleneck(
                    planes=planes,
                    strides=strides,
                    downsample=block == 0 and (strides != 1 or in_channels != planes * 4),
                    form=self.form,
                    num_segments=self.num_segments,
                    attention=self.attention if selected else "none",
                    shift=self.form == "TSM" and selected,
                    shift_place=self.shift_place,
                    inflate=three_d and i3d_inflates(stage, block),
                    partial_bn=self.partial_bn,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    attention_impl=self.attention_impl,
                    name=f"layer{stage + 1}_{block}",
                )
                x = _run_block(block_module, x, train=train, remat=remat)
                in_channels = planes * 4

        # Global average pool over space (and time for I3D), accumulated in float32 (in float64
        # for a float64 network).
        x = jnp.mean(
            x, axis=tuple(range(1, x.ndim - 1)), dtype=jnp.promote_types(x.dtype, jnp.float32)
        )
        if self.num_classes is not None:
            x = nn.Dense(
                self.num_classes,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=self.fc_init,
                name="fc",
            )(x)
        return x
