"""The backbone's convolution, max-pool and batch norm.

The conv and the pool compute exactly what `nn.Conv(use_bias=False)` and `nn.max_pool` compute,
with the same parameter (`kernel`, `(*kernel_size, in, out)`), so checkpoints and conversion are
unchanged.

- `Conv`: a kernel of spatial size 1 (ResNet's conv1 and conv3, the projection shortcuts) is a
  product over channels after striding, and is written as one here. XLA:CPU (jax 0.10) lowers
  the weight gradient of a 1×1 `convolution` to a convolution over the whole image that runs
  2–10× slower than the same contraction as a `dot`, and adds a transposed copy of the input
  (bench/RESULTS.md §2). On GPU and TPU both forms are one GEMM. Other kernels use
  `lax.conv_general_dilated`.
- `max_pool`: the stem's 3×3 / stride 2 pool as a maximum of shifted strided views, with a
  hand-written gradient that sends each output's gradient to the first maximum of its window
  in row-major order, as PyTorch's and XLA's own max-pool gradients do. Autodiff of
  `lax.reduce_window` gives a variadic reduce-window over index maps that takes ~97 ms of a
  ResNet-50 training step on CPU (one 8-frame clip); this takes ~14 ms.
- `BatchNorm`: `nn.BatchNorm`'s variables and function (bit for bit, value and gradient), but
  its running variance moves by the *unbiased* batch variance, as PyTorch's BatchNorm does, so
  that training here moves the running statistics exactly as the release does.

The conv's and max-pool's derivatives are written as `jax.custom_jvp` rules whose transposes
are the reverse-mode gradients described (equal bit for bit to the `custom_vjp`s they replaced,
with the same dots, pads and selects), so that forward mode (`jax.jvp`, `jacfwd`, `hessian`)
works through the backbone too.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

Dtype = Any
Padding = str | Sequence[tuple[int, int]]


class Conv(nn.Module):
    """Bias-free convolution of a channels-last map (`[N, *spatial, C]`), as `nn.Conv`.

    Attributes:
      features: output channels.
      kernel_size: spatial kernel size (2 or 3 numbers).
      strides: spatial strides (default 1).
      padding: 'VALID', 'SAME' or explicit `(low, high)` pairs per spatial axis.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] | None = None
    padding: Padding = "VALID"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_size = tuple(self.kernel_size)
        strides = tuple(self.strides or (1,) * len(kernel_size))
        kernel = self.param(
            "kernel", self.kernel_init, (*kernel_size, x.shape[-1], self.features), self.param_dtype
        )
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        one_by_one = all(k == 1 for k in kernel_size)
        no_pad = self.padding == "VALID" or (
            not isinstance(self.padding, str) and all(p == (0, 0) for p in self.padding)
        )
        if one_by_one and no_pad:
            if any(s != 1 for s in strides):
                x = x[(slice(None), *(slice(None, None, s) for s in strides))]
            return pointwise(x, kernel.reshape(kernel.shape[-2:]))
        spatial = "DHW"[-len(kernel_size) :]
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=strides,
            padding=self.padding,
            dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        )


@jax.custom_jvp
def pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x @ kernel` over the channel axis: a 1×1 convolution of `x` ([N, …, C_in]).

    Args:
      x: the map, channels last.
      kernel: `[C_in, C_out]`.
    """
    return _matmul_rows(x, kernel)


def _matmul_rows(x: jax.Array, kernel: jax.Array) -> jax.Array:
    rows = x.reshape(-1, x.shape[-1])
    return jnp.matmul(rows, kernel).reshape(*x.shape[:-1], kernel.shape[-1])


def _pointwise_jvp(primals, tangents):
    # The tangent is written over the rows of row-major [positions, channels] matrices, so that
    # reverse mode (its transpose) contracts two such matrices over their rows for the kernel
    # gradient. Autodiff of the 4-D contraction contracts the maps over three axes instead, and
    # XLA:CPU then writes one of them transposed first: a strided copy that costs more than the
    # product itself. A custom JVP rather than a custom VJP keeps forward mode (`jax.jvp`) working.
    x, kernel = primals
    dx, dkernel = tangents
    out = pointwise(x, kernel)
    tangent = None
    if not isinstance(dx, SymbolicZero):
        tangent = _matmul_rows(dx, kernel)
    if not isinstance(dkernel, SymbolicZero):
        term = _matmul_rows(x, dkernel)
        tangent = term if tangent is None else tangent + term
    return out, jnp.zeros_like(out) if tangent is None else tangent


pointwise.defjvp(_pointwise_jvp, symbolic_zeros=True)


def _window_views(
    x: jax.Array, window: Sequence[int], strides: Sequence[int], reverse: bool = False
):
    """Yields (offset, view) for every window position; `x` already padded, spatial axes 1….

    `view[n, o…, c] = x[n, o·stride + offset…, c]`, in row-major order of the offsets (or the
    reverse order).
    """
    out_shape = [(x.shape[1 + a] - window[a]) // strides[a] + 1 for a in range(len(window))]
    offsets = list(itertools.product(*(range(w) for w in window)))
    for offset in reversed(offsets) if reverse else offsets:
        start = (0, *offset, 0)
        limit = (
            x.shape[0],
            *(o + (n - 1) * s + 1 for o, n, s in zip(offset, out_shape, strides)),
            x.shape[-1],
        )
        yield offset, jax.lax.slice(x, start, limit, (1, *strides, 1))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def max_pool(
    x: jax.Array,
    window: tuple[int, ...],
    strides: tuple[int, ...],
    padding: tuple[tuple[int, int], ...],
) -> jax.Array:
    """Max pooling of a channels-last map `[N, *spatial, C]`, padded with -inf.

    Args:
      x: the map.
      window, strides: per spatial axis.
      padding: `(low, high)` per spatial axis.

    Returns:
      The pooled map; equal to `nn.max_pool(x, window, strides, padding)`.
    """
    padded = _pad_neg_inf(x, padding)
    return functools.reduce(jnp.maximum, (v for _, v in _window_views(padded, window, strides)))


def _pad_neg_inf(x: jax.Array, padding) -> jax.Array:
    pads = ((0, 0), *padding, (0, 0))
    return jnp.pad(x, pads, constant_values=jnp.asarray(-jnp.inf, x.dtype))


@max_pool.defjvp
def _max_pool_jvp(window, strides, padding, primals, tangents):
    # Each output's tangent is the input tangent at the first maximum of its window (row-major).
    # Its transpose, reverse mode's gradient, is then the same rule: strided views of the
    # tangent become interior-padded scatters of the output gradient, `where`s pick the claimed
    # position, and no variadic reduce-window over index maps appears (autodiff of
    # `lax.reduce_window`). A custom JVP rather than a custom VJP keeps forward mode working.
    (x,), (dx,) = primals, tangents
    out = max_pool(x, window, strides, padding)
    padded = _pad_neg_inf(x, padding)
    dpadded = jnp.pad(dx, ((0, 0), *padding, (0, 0)))
    zero = np.zeros((), dx.dtype)
    unclaimed = jnp.ones(out.shape, bool)
    hits = []
    for _, view in _window_views(padded, window, strides):
        # The first position of the window (row-major) that holds the maximum takes it all.
        hits.append(unclaimed & (view == out))
        unclaimed = unclaimed & ~hits[-1]
    # Taken in reverse order: reverse mode transposes the last first, so that the gradient adds
    # the windows' contributions in row-major order (the order of the earlier hand-written one).
    dout = None
    for hit, (_, dview) in zip(reversed(hits), _window_views(dpadded, window, strides, True)):
        term = jnp.where(hit, dview, zero)
        dout = term if dout is None else dout + term
    return out, dout


def update_running_stats(
    ra_mean: Any, ra_var: Any, mean: jax.Array, var: jax.Array, n: int, momentum: float
) -> None:
    """Moves the running statistics (Flax `Variable`s) as `torch.nn.BatchNorm*d` does.

    `mean` and `var` are the batch's (biased variance) over `n` values per channel; the running
    variance moves by the unbiased one, var · n / (n − 1). One value (n = 1) has no unbiased
    variance (PyTorch refuses to train on it): the biased one (0) is used. An empty batch
    (n = 0) leaves them unchanged, as in PyTorch: its statistics are NaN (0 / 0), which would
    otherwise poison every BatchNorm of the network for good.
    """
    if n == 0:
        return
    unbiased = var * (n / (n - 1)) if n > 1 else var
    ra_mean.value = momentum * ra_mean.value + (1 - momentum) * mean
    ra_var.value = momentum * ra_var.value + (1 - momentum) * unbiased


class BatchNorm(nn.Module):
    """Batch norm over every axis but the last, as `nn.BatchNorm` with PyTorch's running variance.

    The same `scale`/`bias` parameters, `mean`/`var` statistics (float32), output and gradient
    as `nn.BatchNorm(momentum=…, epsilon=…)` (biased batch variance `E[x²] − E[x]²` clipped at
    0, in float32 or wider); only the running variance differs: it is updated with the batch
    variance times n / (n − 1) (n values per channel), as `torch.nn.BatchNorm*d` updates
    `running_var`. Under `jit` over a sharded batch the statistics are the global batch's.

    Attributes:
      use_running_average: normalise by the running statistics (eval, or frozen by partial BN).
      momentum: weight of the old running statistics (Flax's convention: 0.9 = torch's 0.1).
      epsilon: added to the variance.
      dtype: output dtype.
      param_dtype: dtype of `scale` and `bias`.
    """

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        ra_mean = self.variable(
            "batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features
        )
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
        scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
        axes = tuple(range(x.ndim - 1))
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            squares = jax.lax.square(wide)
            mean, mean_square = wide.mean(axes), squares.mean(axes)
            var = jnp.maximum(0.0, mean_square - jax.lax.square(mean))
            if not self.is_initializing():
                n = x.size // x.shape[-1]
                update_running_stats(ra_mean, ra_var, mean, var, n, self.momentum)
        # In nn.BatchNorm's order of operations and shapes, so that the gradients (whose terms
        # autodiff adds in that order) come out bit for bit.
        shape = (1,) * len(axes) + features
        y = x - jnp.expand_dims(mean, axes)
        mul = jax.lax.rsqrt(jnp.expand_dims(var, axes) + self.epsilon)
        y = y * (mul * scale.reshape(shape)) + bias.reshape(shape)
        return y.astype(self.dtype)


class Dropout(nn.Module):
    """`nn.Dropout` (the same mask from the same key), also under explicit sharding.

    `nn.Dropout` draws its mask unsharded, and `lax.select` refuses a mask whose sharding is
    not its inputs' when the mesh's axes are `Explicit` (`jax.make_mesh`'s default): a batch
    sharded that way could not be trained. The mask here is drawn with the inputs' sharding;
    its values do not depend on the sharding (JAX's partitionable threefry).

    Attributes:
      rate: the probability of dropping an element.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(
            self.make_rng("dropout"), keep, x.shape, out_sharding=jax.typeof(x).sharding
        )
        return jax.lax.select(mask, x / keep, jnp.zeros_like(x))
