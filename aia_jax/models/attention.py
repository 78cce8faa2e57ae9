"""The AIA gates (C, T, H, W), the units C / ST / CinST / STinC and the eleven placements.

Everything works on feature maps laid out `[b, t, h, w, c]` (b clips of t frames). The release
permutes the whole map into `[b, t, c, h, w]` for every gate; here only the small pooled context
is touched: each gate's 2→1-channel 3×3×3 convolution slides over the pooled map in the order
its axes already have, and the release's kernel is permuted (54 numbers) to that order instead.
The stored kernel keeps the release's `(D1, D2, D3)` order, so a converted kernel works unchanged.

Two implementations compute the same function with the same parameters (`impl`):
- `'fused'` (the default): `aia_jax.models.fused` — all pools of a unit in one call, the gate
  convolution as 27 shifted multiply-adds, and hand-written gradients. Equal to `'xla'` to
  float32 rounding in value and gradient (tests/test_fused.py), and to the PyTorch reference
  (tests/test_parity.py).
- `'xla'`: the plain formulation (`jnp.max`/`jnp.mean`, `lax.conv_general_dilated`, broadcast
  multiplies) with autodiff gradients; the readable reference, several times slower on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aia_jax.models import fused
from aia_jax.models.layers import BatchNorm, update_running_stats

Dtype = Any

IMPLS = ("xla", "fused")
# 'fused' avoids XLA:CPU's slow small-channel Conv3d, axis-1 reductions and autodiff
# transposes: on CPU (bench/RESULTS.md §3, runs of 2026-12-05 and 12-06) TSM+CinST/STinC cost
# about +2..12 % (inference) and +4..12 % (batch-1 training step) over the plain TSM with it,
# against +120..300 % with 'xla' (and +26..45 % for the PyTorch release); two units cost about
# twice that. It compiles in ~3x the time of 'xla' (~40-50 s for a ResNet-50 training step on 2
# cores). On GPU it has not been measured against 'xla' yet (bench/gpu_session.sh does).
DEFAULT_IMPL = "fused"

# For each gate: the axis of the `[b, t, h, w, c]` map it pools over, and how the release's
# kernel axes (D1, D2, D3) map onto the axes the pooled map keeps here. The release's Conv3d
# inputs (official-aia.md) are C: (t, h, w), T: (c, h, w), H: (t, c, w), W: (t, h, c); pooling
# here keeps the remaining axes in `[t, h, w, c]` order, i.e. C: (t, h, w), T: (h, w, c),
# H: (t, w, c), W: (t, h, c). `kernel_perm` reorders the release kernel to the latter.
GATE_POOL_AXIS = {"C": 4, "T": 1, "H": 2, "W": 3}
GATE_KERNEL_PERM = {
    "C": (0, 1, 2, 3, 4),
    "T": (1, 2, 0, 3, 4),
    "H": (0, 2, 1, 3, 4),
    "W": (0, 1, 2, 3, 4),
}

# The eleven placements of the release: the units they hold and how two units combine.
PLACEMENTS: dict[str, tuple[tuple[str, ...], str]] = {
    "none": ((), ""),
    "C": (("C",), ""),
    "ST": (("ST",), ""),
    "C2ST": (("C", "ST"), "sequential"),
    "ST2C": (("ST", "C"), "sequential"),
    "CplusST": (("C", "ST"), "sum"),
    "CinST": (("CinST",), ""),
    "STinC": (("STinC",), ""),
    "CinST2STinC": (("CinST", "STinC"), "sequential"),
    "STinC2CinST": (("STinC", "CinST"), "sequential"),
    "STinCplusCinST": (("STinC", "CinST"), "sum"),
}

UNIT_GATES = {"C": ("C",), "ST": ("T", "H", "W"), "CinST": ("C", "T", "H", "W")}
UNIT_GATES["STinC"] = UNIT_GATES["CinST"]


def pool_max_mean(x: jax.Array, axis: int, anchor: jax.Array | None = None) -> jax.Array:
    """Max and mean of `x` over `axis`, stacked as a trailing 2-channel axis, max first.

    Both in `fused.compute_dtype`: the mean is accumulated in float32 at least, so that bf16
    maps with thousands of channels pool exactly, and a float64 map pools in float64.
    `anchor`: as `fused.pool`'s.
    """
    # jnp.max's gradient compares the map with its maximum; written once, the map cannot be
    # recomputed differently for the two (see `fused.pool`'s forward pass).
    x = fused.materialize(x, x if anchor is None else anchor)
    acc = fused.compute_dtype(x.dtype)
    mx = jnp.max(x, axis=axis).astype(acc)
    mean = jnp.mean(x, axis=axis, dtype=acc)
    return jnp.stack([mx, mean], axis=-1)


class GateConv(nn.Module):
    """The release's bias-free Conv3d(2, 1, 3, padding=1) of one gate.

    Attributes:
      gate: which gate ('C', 'T', 'H', 'W'); fixes how the stored kernel is permuted.
      impl: 'xla' (`lax.conv_general_dilated`) or 'fused' (`fused.gate_conv`: taps). Both
        compute in float32, or in the pooled map's dtype when wider ('xla': or in `dtype` when
        wider), and return `dtype`.
    """

    gate: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    impl: str = DEFAULT_IMPL

    def setup(self) -> None:
        """Declares the kernel (checking `gate` and `impl` first)."""
        if self.gate not in GATE_POOL_AXIS:
            raise ValueError(f"unknown gate {self.gate!r}; expected one of {list(GATE_POOL_AXIS)}")
        if self.impl not in IMPLS:
            raise ValueError(f"unknown impl {self.impl!r}; expected one of {IMPLS}")
        # Stored in the release's (D1, D2, D3, in, out) order: torch [1, 2, 3, 3, 3] → (2,3,4,1,0).
        self.kernel = self.param("kernel", self.kernel_init, (3, 3, 3, 2, 1), self.param_dtype)

    def __call__(self, pooled: jax.Array) -> jax.Array:
        """Maps the pooled context `[b, D1, D2, D3, 2]` (max, mean) to `[b, D1, D2, D3, 1]`."""
        if pooled.ndim != 5 or pooled.shape[-1] != 2:
            raise ValueError(
                f"GateConv: a pooled context [b, D1, D2, D3, 2] expected (max, mean), "
                f"got {pooled.shape}"
            )
        if self.impl == "fused":
            return self.taps(pooled[..., 0], pooled[..., 1])[..., None].astype(self.dtype)
        if self.impl != "xla":
            raise ValueError(f"unknown impl {self.impl!r}; expected one of {IMPLS}")
        # In float32 for a bf16 network (as 'fused' computes it), in float64 for a float64 one.
        acc = fused.compute_dtype(pooled.dtype, self.dtype)
        kernel = jnp.transpose(self.kernel, GATE_KERNEL_PERM[self.gate]).astype(acc)
        return jax.lax.conv_general_dilated(
            pooled.astype(acc),
            kernel,
            window_strides=(1, 1, 1),
            padding=((1, 1), (1, 1), (1, 1)),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        ).astype(self.dtype)

    def taps(self, p_max: jax.Array, p_mean: jax.Array) -> jax.Array:
        """The convolution by `fused.gate_conv`: `[b, D1, D2, D3]` from the two channels.

        It computes in `fused.compute_dtype` of the channels. Taking the channels apart skips the
        stacked `[..., 2]` copy (and its gradient's).
        """
        return fused.gate_conv(p_max, p_mean, self.map_order_kernel())

    def map_order_kernel(self) -> jax.Array:
        """The kernel permuted to the order of the pooled map's axes (`GATE_KERNEL_PERM`)."""
        return jnp.transpose(self.kernel, GATE_KERNEL_PERM[self.gate])


class GateNorm(nn.Module):
    """The gate's `BatchNorm3d(1)` for `impl='fused'`: `layers.BatchNorm`'s variables and function.

    The same `scale`/`bias` parameters and `mean`/`var` statistics (momentum 0.9 as Flax counts
    it; normalised by the biased batch variance, the running variance moved by the unbiased one
    as in PyTorch), so checkpoints do not depend on `impl`; in training the batch statistics and
    their gradient come from `fused.batch_norm` (one reduction each way).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        features = (x.shape[-1],)
        stats = jnp.float32
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stats), features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stats), features)
        scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if not train:
            y = (x - ra_mean.value) * (jax.lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
            return y.astype(self.dtype)
        y, mean, var = fused.batch_norm(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            n = x.size // x.shape[-1]
            update_running_stats(ra_mean, ra_var, mean, var, n, self.momentum)
        return y.astype(self.dtype)


def _norm(dtype: Dtype, param_dtype: Dtype, train: bool, name: str) -> BatchNorm:
    return BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def _apply_gate(
    x: jax.Array, gate: str, conv: GateConv, bn: BatchNorm, x_dtype: Dtype
) -> jax.Array:
    """`sigmoid(BN(conv(pool(x))))`, shaped to broadcast onto `x` ([b, t, h, w, c])."""
    axis = GATE_POOL_AXIS[gate]
    logits = bn(conv(pool_max_mean(x, axis, conv.kernel)))
    g = jax.nn.sigmoid(logits.astype(fused.compute_dtype(logits.dtype)))
    return jnp.expand_dims(g[..., 0], axis).astype(x_dtype)


class AttentionUnit(nn.Module):
    """One unit of the release: 'C', 'ST', 'CinST' or 'STinC' (official-aia.md, "The units").

    Submodules are named as the release's keys (`C_conv`, `C_bn`, `T_conv`, …); `impl` ('xla'
    or 'fused') changes how they are computed, not the parameters.
    """

    unit: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = DEFAULT_IMPL

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if self.impl not in IMPLS:
            raise ValueError(f"unknown impl {self.impl!r}; expected one of {IMPLS}")
        if self.unit not in UNIT_GATES:
            raise ValueError(
                f"unknown attention unit {self.unit!r}; expected one of {list(UNIT_GATES)}"
            )
        if x.ndim != 5 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"AttentionUnit: a floating-point map [b, t, h, w, c] expected, "
                f"got {x.dtype} {x.shape}"
            )

        def norm(gate: str) -> Callable[[jax.Array], jax.Array]:
            if self.impl == "fused":
                module = GateNorm(self.dtype, self.param_dtype, name=f"{gate}_bn")
                return partial(module, train=train)
            return _norm(self.dtype, self.param_dtype, train, f"{gate}_bn")

        gates = {
            g: (
                GateConv(g, self.dtype, self.param_dtype, impl=self.impl, name=f"{g}_conv"),
                norm(g),
            )
            for g in UNIT_GATES[self.unit]
        }
        if self.impl == "fused":
            return self._fused(x, gates)

        def gate(name: str, inp: jax.Array) -> jax.Array:
            return _apply_gate(inp, name, *gates[name], x.dtype)

        def st_gate(inp: jax.Array) -> jax.Array:
            return (gate("T", inp) + gate("H", inp) + gate("W", inp)) / 3

        if self.unit == "C":
            return x * gate("C", x)
        if self.unit == "ST":
            return x * st_gate(x)
        if self.unit == "CinST":
            return x * st_gate(x * gate("C", x))
        if self.unit == "STinC":
            return x * gate("C", x * st_gate(x))
        raise AssertionError(self.unit)

    def _fused(self, x: jax.Array, gates: dict[str, tuple[GateConv, Callable]]) -> jax.Array:
        """The unit with `fused` primitives: one pooling call per map, one product per gating."""

        def gate_values(inp: jax.Array, names: str) -> tuple[jax.Array, ...]:
            axes = tuple(GATE_POOL_AXIS[n] for n in names)
            out = []
            # A gate's kernel anchors the pool's copy of the map: replicated, so that a
            # sharded batch needs no collective for it (`fused.pool`).
            pooled = fused.pool(inp, axes, gates[names[0]][0].kernel)
            # One call for the unit's gates, which computes gates of one pooled shape stacked.
            convs = fused.gate_convs(
                [mx for mx, _ in pooled],
                [mean for _, mean in pooled],
                [gates[n][0].map_order_kernel() for n in names],
            )
            for n, conv in zip(names, convs, strict=True):
                logits = gates[n][1](conv.astype(self.dtype)[..., None])[..., 0]
                out.append(jax.nn.sigmoid(logits.astype(fused.compute_dtype(logits.dtype))))
            return tuple(out)

        def apply(inp: jax.Array, names: str, values: tuple[jax.Array, ...]) -> jax.Array:
            axes = tuple(GATE_POOL_AXIS[n] for n in names)
            return fused.gate_product(inp, values, axes, (1.0 / len(names),) * len(names))

        if self.unit == "C":
            return apply(x, "C", gate_values(x, "C"))
        if self.unit == "ST":
            return apply(x, "THW", gate_values(x, "THW"))
        if self.unit == "CinST":
            y = apply(x, "C", gate_values(x, "C"))
            return apply(x, "THW", gate_values(y, "THW"))
        z = apply(x, "THW", gate_values(x, "THW"))  # STinC
        return apply(x, "C", gate_values(z, "C"))


def apply_placement(
    placement: str,
    x: jax.Array,
    *,
    train: bool,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    impl: str = DEFAULT_IMPL,
) -> jax.Array:
    """Applies a placement's units to `x` ([b, t, h, w, c]) inside the calling module.

    Called from a compact method, the units become submodules of the caller named `eft`
    (one unit) or `eft1`/`eft2` (two), exactly as in the release's bottleneck. `impl` picks
    the computation ('xla' or 'fused'); the parameters are the same.
    """
    if placement not in PLACEMENTS:
        raise ValueError(
            f"unknown attention placement {placement!r}; expected one of {list(PLACEMENTS)}"
        )
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    units, combine = PLACEMENTS[placement]
    make = partial(AttentionUnit, dtype=dtype, param_dtype=param_dtype, impl=impl)
    if not units:
        return x
    if len(units) == 1:
        return make(units[0], name="eft")(x, train=train)
    first, second = make(units[0], name="eft1"), make(units[1], name="eft2")
    if combine == "sequential":
        return second(first(x, train=train), train=train)
    return 0.5 * first(x, train=train) + 0.5 * second(x, train=train)


class Attention(nn.Module):
    """A placement of the release as a standalone module, for use in other networks.

    Input and output are `[b, t, h, w, c]`; its units are named `eft` or `eft1`/`eft2`.
    """

    placement: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = DEFAULT_IMPL

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return apply_placement(
            self.placement,
            x,
            train=train,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            impl=self.impl,
        )
