"""Fused AIA gate arithmetic with hand-written gradients (`jax.custom_vjp`).

The plain path of `attention.py` (`impl='xla'`) writes each gate as `jnp.max`/`jnp.mean`,
`lax.conv_general_dilated` and a broadcast multiply, and lets autodiff derive the gradient. On
XLA:CPU (jax 0.10) two of those lower to pathological code (measured, see bench/RESULTS.md):

- the 2→1-channel 3×3×3 `Conv3d` of a gate runs through a generic convolution path: about
  0.2 s for the 22 MFLOP T gate of one ResNet-50 `layer1` block, 1000× slower than its FLOPs;
- a reduction over axis 1 of a `[b, t, h, w, c]` map (the T gate's pool, and the transpose of
  its broadcast) becomes a YNNPACK fusion that is ~100× slower than summing the t slices.

The primitives here avoid both, and their gradients are written out so that XLA sees a few
elementwise passes and reductions instead of what autodiff would trace (at batch 1 every
kernel costs microseconds to launch whatever its size, so fewer kernels is faster):

- `pool(x, axes)`: max and mean of `x` over each of `axes` (one call for all axes a unit
  pools over), a map axis's pair from one variadic reduction, which reads the map once and
  in inference takes its producer fused in; gradient `mask·dmax/ties + dmean/n`, the same
  subgradient as `jnp.max` (ties share the gradient equally), with the ties counted in the
  forward pass's reduction, and the map written to memory once so that both passes see the
  same values.
- `gate_conv(p_max, p_mean, kernel)`: the gate's convolution as 27 shifted multiply-adds of
  the small pooled map; input gradient by the flipped taps, kernel gradient as one variadic
  reduction (54 sums in one loop). `gate_convs` computes several gates' convolutions, those of
  one pooled shape (the H and W gates of a square map) stacked as one set of taps.
- `gate_product(x, gates, axes, weights)`: `x · Σ w·gate` with each gate broadcast along the
  axis it was pooled over; gradient `dout·Σ w·gate` and, per gate, `w·Σ_axis(dout·x)`.
- `batch_norm(x, scale, bias, epsilon)`: the gate's training-mode batch norm, its statistics
  and its gradient's two sums each one variadic reduction (`attention.GateNorm` holds its
  variables, named as `nn.BatchNorm`'s).

Gates compute in float32 (`compute_dtype`: a bf16 or float32 map's), or in the map's own
dtype when it is wider (float64 under x64), so that a float64 network is float64 throughout.

Nothing here is CPU-specific: on GPU the same programs are a handful of fused loops.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The map is [b, t, h, w, c]; XLA:CPU reduces axis 1 slowly (see module docstring), so that
# axis is summed by a variadic reduction that XLA emits itself (`_sum`).
_SLICED_AXIS = 1

_TAPS = list(itertools.product(range(3), repeat=3))


def compute_dtype(*dtypes) -> jnp.dtype:
    """The dtype a gate computes in for maps of `dtypes`: float32, or the widest when wider."""
    return functools.reduce(jnp.promote_types, dtypes, jnp.dtype(jnp.float32))


def _sum(x: jax.Array, axis: int) -> jax.Array:
    """Sum of `x` over `axis`, in `compute_dtype`.

    Over axis 1, XLA:CPU hands a plain reduction to a YNNPACK fusion ~20× slower than adding
    the t slices, but a chain of slice additions it fuses into every user, which then redoes
    it from the full map (the T gate's batch-norm and kernel gradients would each read the map
    again; `lax.optimization_barrier` does not survive its pipeline). So axis 1 is reduced as
    one variadic reduction over the axis's two halves: a loop XLA emits itself, and being a
    reduction, computed once into memory.
    """
    x = x.astype(compute_dtype(x.dtype))
    if axis != _SLICED_AXIS or x.shape[axis] < 2:
        return jnp.sum(x, axis=axis)
    half = x.shape[axis] // 2
    lo = jax.lax.slice_in_dim(x, 0, half, axis=axis)
    hi = jax.lax.slice_in_dim(x, half, 2 * half, axis=axis)
    zero = jnp.zeros((), x.dtype)
    a, b = jax.lax.reduce((lo, hi), (zero, zero), lambda p, q: (p[0] + q[0], p[1] + q[1]), (axis,))
    out = a + b
    if x.shape[axis] % 2:
        out = out + jax.lax.index_in_dim(x, 2 * half, axis, keepdims=False)
    return out


def _chunked_reduce(
    operands: tuple[jax.Array, ...],
    init: tuple[jax.Array, ...],
    combine: Callable[[tuple, tuple], tuple],
    axis: int,
) -> tuple[jax.Array, ...]:
    """A variadic `lax.reduce` of `operands` over `axis`, in two stages when the axis is long.

    XLA:CPU emits a variadic reduction as its own loop, fast over a short axis only (8 frames:
    0.2 ms for a `layer1` map, against ~1.5 ms over 56 rows), so a long axis is reduced over
    chunks of at most 8 first and then over the chunks. `combine` must be associative.
    """
    n = operands[0].shape[axis]
    chunk = max(d for d in range(1, min(n, 8) + 1) if n % d == 0)
    if chunk in (1, n):
        return tuple(jax.lax.reduce(operands, init, combine, (axis,)))
    shape = operands[0].shape
    split = shape[:axis] + (n // chunk, chunk) + shape[axis + 1 :]
    partial = jax.lax.reduce(tuple(o.reshape(split) for o in operands), init, combine, (axis + 1,))
    return tuple(jax.lax.reduce(partial, init, combine, (axis,)))


def _max_sum(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Max (in x's dtype) and sum (`compute_dtype`) of `x` over `axis`: the undifferentiated pool.

    Over the map axes both come from one variadic reduction (`_chunked_reduce`): one read of
    the map, and a loop XLA:CPU writes itself, into which it fuses the map's producer (CinST's
    `x · C-gate`), where the YNNPACK reductions it picks for a plain `max` or `sum` need that
    product written to memory first: CinST's inference over ResNet-50's 16 blocks took 11-15 %
    less time, STinC's 3-4 % (bench/RESULTS.md §3, 2026-12-05). The channel axis, contiguous
    in memory, reduces fastest as two plain reductions.
    """
    if axis == x.ndim - 1:
        return jnp.max(x, axis=axis), _sum(x, axis)
    # A variadic reduction needs one precision: at least float32 (exact for a bf16 map's max),
    # and the map's own when wider, so that the max still equals one of its elements.
    acc = compute_dtype(x.dtype)
    xa = x.astype(acc)
    mx, total = _chunked_reduce(
        (xa, xa),
        (jnp.array(-jnp.inf, acc), jnp.array(0, acc)),
        lambda a, b: (jnp.maximum(a[0], b[0]), a[1] + b[1]),
        axis,
    )
    return mx.astype(x.dtype), total


def _as_stored(x: jax.Array) -> jax.Array:
    """`x` in at least float32, holding exactly the values x's own dtype can store.

    The pool's forward pass counts the ties of the max and its backward pass finds them again;
    both must see the same values. Under jit, XLA may compute a bf16/f16 map's producer in
    float32 and skip the rounding (excess precision), differently in the two passes: then two
    elements that round to the max both take the gradient with a count of 1. `reduce_precision`
    is an explicit rounding XLA keeps.
    """
    acc = compute_dtype(x.dtype)
    xa = x.astype(acc)
    if acc == x.dtype:
        return xa
    info = jnp.finfo(x.dtype)
    return jax.lax.reduce_precision(xa, exponent_bits=info.nexp, mantissa_bits=info.nmant)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_count_sum(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Max of `x` over `axis` (in x's dtype), how many elements equal it, and the sum.

    The count and the sum are in `compute_dtype`.

    One variadic reduction (`_chunked_reduce`), i.e. one read of the map, gives what the pool's
    gradient needs (the tie count included, which would otherwise take a second pass after the
    max); counts combine as `Σ count where the partial max is the max`.
    """
    xa = _as_stored(x)
    acc = xa.dtype

    def combine(a, b):
        mx = jnp.maximum(a[0], b[0])
        count = jnp.where(a[0] == mx, a[1], 0) + jnp.where(b[0] == mx, b[1], 0)
        return mx, count, a[2] + b[2]

    init = (jnp.array(-jnp.inf, acc), jnp.array(0, acc), jnp.array(0, acc))
    mx, count, total = _chunked_reduce((xa, jnp.ones_like(xa), xa), init, combine, axis)
    return mx.astype(x.dtype), count, total


@_max_count_sum.defjvp
def _max_count_sum_jvp(axis, primals, tangents):
    # Only a gradient of a gradient differentiates the pool's forward pass. JAX's derivative of
    # a variadic reduction fails on the tie count's constant operand (its tangent is a symbolic
    # zero), so the derivative is written out: jnp.max's (the tangent at the maxima, averaged
    # over ties), none for the count, the sum's for the sum.
    (x,), (dx,) = primals, tangents
    mx, count, total = _max_count_sum(x, axis)
    stored = _as_stored(x)
    hit = stored == _expand(mx, axis).astype(stored.dtype)
    # Plain sums: reverse mode transposes these, which it cannot do for a variadic reduction.
    dx = dx.astype(total.dtype)
    d_max = jnp.sum(jnp.where(hit, dx, 0), axis=axis) / count
    d_total = jnp.sum(dx, axis=axis)
    return (mx, count, total), (d_max.astype(mx.dtype), jnp.zeros_like(count), d_total)


def _reduce_product(a: jax.Array, b: jax.Array, axis: int) -> jax.Array:
    """`Σ_axis a·b` in `compute_dtype`.

    Written as a contraction: XLA:CPU rewrites `reduce(multiply)` into a badly shaped dot that
    runs ~50× slower than this einsum (0.1 s for one `layer1` map). Axis 1 goes by `_sum`.
    """
    acc = compute_dtype(a.dtype, b.dtype)
    if axis == _SLICED_AXIS:
        return _sum(a.astype(acc) * b.astype(acc), axis)
    letters = "abcdefgh"[: a.ndim]
    out = letters[:axis] + letters[axis + 1 :]
    spec = f"{letters},{letters}->{out}"
    return jnp.einsum(spec, a, b, preferred_element_type=acc)


def _expand(v: jax.Array, axis: int) -> jax.Array:
    return jnp.expand_dims(v, axis)


# --- pooling --------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def pool(
    x: jax.Array, axes: Sequence[int], anchor: jax.Array | None = None
) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """Max and mean of `x` over each axis in `axes`, both in `compute_dtype`.

    Args:
      x: the feature map (any float dtype).
      axes: the axes to pool over, one (max, mean) pair per axis.
      anchor: any small traced array, replicated when `x` is sharded (a gate's kernel), for
        `materialize` under differentiation; None reads `x` itself (a few elements), which over a
        sharded batch costs a small all-reduce. Its gradient is zero.

    Returns:
      `((max_0, mean_0), (max_1, mean_1), …)`, each with that axis removed.
    """
    return _pool_values(x, axes)


def _pool_values(x, axes):
    out = []
    for a in axes:
        mx, total = _max_sum(x, a)
        out.append((mx.astype(total.dtype), total / x.shape[a]))
    return tuple(out)


def _pool_fwd(x, axes, anchor):
    # The backward pass finds the maxima again by comparing the map with them, so it must read
    # the very values the forward pass reduced. Left to itself XLA:CPU fuses the map's producer
    # (a batch norm, `x · gate`) into both passes, and the two copies can round differently: a
    # maximum is then not found and its gradient is lost (jaxlib 0.10.2 lost 0.5-15 % of whole
    # networks' gradients so; bench/RESULTS.md section 3). Written to memory once, it cannot.
    x = materialize(x, x if anchor is None else anchor)
    # Under differentiation each axis is one pass that also counts the ties for the gradient.
    stats = [_max_count_sum(x, a) for a in axes]
    out = tuple((m.astype(s.dtype), s / x.shape[a]) for a, (m, _, s) in zip(axes, stats))
    return out, (x, tuple((m, ties) for m, ties, _ in stats), anchor)


def _pool_bwd(axes, res, cts):
    x, stats, anchor = res
    stored = _as_stored(x)
    dx = None
    for a, (m, ties), (dmax, dmean) in zip(axes, stats, cts, strict=True):
        hit = stored == _expand(m, a).astype(stored.dtype)
        # Ties share the gradient, as jnp.max's does. Both pooled factors are divisions by a
        # computed value: XLA:CPU fuses a cheap producer (`dmean / 8` is a multiply) into a user
        # that broadcasts it, which would redo the gate convolution's gradient for every element
        # of the map; an expensive one it writes once.
        mean_scale = dmean / (ties * 0 + x.shape[a])
        term = jnp.where(hit, _expand(dmax / ties, a), 0.0) + _expand(mean_scale, a)
        dx = term if dx is None else dx + term
    return dx.astype(x.dtype), jax.tree.map(jnp.zeros_like, anchor)


pool.defvjp(_pool_fwd, _pool_bwd)


# --- the gate convolution -------------------------------------------------------------------


def _padded(v: jax.Array, width: int, anchor: jax.Array) -> jax.Array:
    """`v` zero-padded by `width` on its three map axes (the last three), computed once into memory.

    The taps read it at 27 offsets per element, and XLA:CPU would fuse the padding into their
    loop as a bounds check on every read. It does not fuse an expensive op (a division) into a
    user that reads each element more than once, so the padded map is divided by an exact 1
    that XLA cannot constant-fold, made from an element of `anchor` (1 for any value, NaN
    included): the gate's kernel, which is replicated where the map's batch is sharded (an
    element of the map itself is on one device only, which explicit sharding refuses to
    index) and has an element even when the batch is empty. The padding is written as zero
    slabs joined on: XLA:CPU's loop for that runs 2× faster than its `pad` (a `layer1` T
    gate's 58 × 58 × 66 map: ~50 against ~110 µs).
    """
    probe = _probe(anchor)
    one = (probe != probe).astype(v.dtype) * 0 + 1
    # The slabs take the map's sharding: joined to a batch-sharded map, an unsharded slab is
    # refused under explicit sharding.
    sharding = jax.typeof(v).sharding
    for axis in range(v.ndim - 1, v.ndim - 4, -1):
        shape = v.shape[:axis] + (width,) + v.shape[axis + 1 :]
        slab = jnp.zeros(shape, v.dtype, out_sharding=sharding)
        v = jnp.concatenate([slab, v, slab], axis=axis)
    return v / one


def _interleaved_sum(terms: Iterable[jax.Array], chains: int = 4) -> jax.Array:
    """`Σ terms`, added into `chains` running sums taken in turn, which are then added up.

    XLA keeps the order of floating-point additions, so the 54 taps of a gate convolution
    summed left to right are one chain of dependent vector adds per element, and the add's
    latency bounds the loop. Four independent chains let the core overlap them: the T gate's
    taps over a `layer1` map (56 × 56 × 64) take 25 % less time (bench/RESULTS.md §3,
    2026-12-06); eight were slower on every stage but the last.
    """
    sums: list[jax.Array] = []
    for n, term in enumerate(terms):
        if n < chains:
            sums.append(term)
        else:
            sums[n % chains] = jax.lax.add(sums[n % chains], term)
    while len(sums) > 1:
        pairs = zip(sums[::2], sums[1::2])
        sums = [jax.lax.add(a, b) for a, b in pairs] + sums[len(sums) // 2 * 2 :]
    return sums[0]


# The taps are written in `lax` primitives (`_window`, `_element`, `lax.mul`/`lax.add`), ~700
# per gate in a training step. With `jnp`'s operators and indexing (each a small jitted
# function) a TSM_CinST_BN ResNet-50 training step traced in 4.5 s, with these in 3.5 s; its
# inference in 1.3 and 0.9 s (bench/RESULTS.md §4, "Compile time"). The lowered program is the
# same, op for op.


def _window(v: jax.Array, start: Sequence[int], shape: Sequence[int]) -> jax.Array:
    """`v[…, s1 : s1 + n1, s2 : s2 + n2, s3 : s3 + n3]` for `start` (s1, …) and `shape` (n1, …)."""
    lead = v.shape[: v.ndim - len(start)]
    limit = (*lead, *(s + n for s, n in zip(start, shape)))
    return jax.lax.slice(v, (0,) * len(lead) + tuple(start), limit)


def _element(weights: jax.Array, *index: int) -> jax.Array:
    """`weights[index]` as a scalar (which `lax.mul` broadcasts against a map)."""
    return jax.lax.reshape(jax.lax.slice(weights, index, tuple(i + 1 for i in index)), ())


def _scaled(v: jax.Array, weights: jax.Array, *index: int) -> jax.Array:
    """`v · weights[index]`: a scalar weight, or for stacked gates (`weights` with a trailing
    gate axis) gate g's weight times `v[g]`."""
    if weights.ndim == len(index):
        return jax.lax.mul(v, _element(weights, *index))
    per_gate = jax.lax.slice(weights, (*index, 0), (*(i + 1 for i in index), weights.shape[-1]))
    per_gate = jax.lax.reshape(per_gate, (weights.shape[-1],))
    sharding = jax.typeof(v).sharding
    return jax.lax.mul(v, jax.lax.broadcast_in_dim(per_gate, v.shape, (0,), out_sharding=sharding))


def _taps(padded: Sequence[jax.Array], weights: jax.Array) -> jax.Array:
    """`Σ_tap Σ_i weights[tap, i] · padded[i][· + tap]` — a 'same' 3×3×3 cross-correlation.

    Args:
      padded: the inputs `[b, D1, D2, D3]` or, for stacked gates, `[gates, b, D1, D2, D3]`,
        each zero-padded by 1 on the map axes (`_padded`).
      weights: `[27, len(padded)]`, taps in (D1, D2, D3) row-major order; `[27, len(padded),
        gates]` for stacked gates.
    """
    shape = tuple(n - 2 for n in padded[0].shape[-3:])
    return _interleaved_sum(
        _scaled(_window(v, tap, shape), weights, t, c)
        for t, tap in enumerate(_TAPS)
        for c, v in enumerate(padded)
    )


def _probe(a: jax.Array) -> jax.Array:
    """A traced scalar read from few elements of a non-empty `a`: its first one, or under
    explicit sharding the maximum of the first ones along each sharded axis.

    Explicit sharding refuses to index one element of a sharded axis (it lives on one device
    only); keeping those axes whole costs a reduction over one element per shard.
    """
    spec = tuple(jax.typeof(a).sharding.spec)
    spec += (None,) * (a.ndim - len(spec))
    return jnp.max(a[tuple(slice(None) if s is not None else slice(0, 1) for s in spec)])


def materialize(x: jax.Array, anchor: jax.Array, axis: int = 1) -> jax.Array:
    """`x`, computed once into memory instead of being fused into (and recomputed by) its users.

    XLA:CPU fuses an elementwise producer into every elementwise user, whatever it costs: the
    54 multiply-adds of a gate convolution would be redone by the batch norm, its statistics
    and its gradient (`lax.optimization_barrier` does not survive its pipeline), and the copies
    need not round alike, which breaks users that compare values across them. Read back
    through a dynamic slice along `axis` (one a mesh does not shard) whose start XLA cannot
    constant-fold (`anchor` is any traced array; the start is clamped to 0), `x` is written
    once. An empty `anchor` anchors on `x` itself.
    """
    if x.size == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, 1)
    stacked = jnp.pad(x, widths)
    start = jnp.minimum(_probe(anchor if anchor.size else x).astype(jnp.int32), 0)
    # A negative start must clamp to 0, not count from the end (which shifted the map by one
    # wherever the anchor's first element was -1 or less).
    return jax.lax.dynamic_slice_in_dim(
        stacked, start, x.shape[axis], axis=axis, allow_negative_indices=False
    )


def _kernel_grad(padded: Sequence[jax.Array], wide: jax.Array) -> jax.Array:
    """`dk[tap, i] = Σ_x padded[i][x + tap] · dout[x]` for all 27 taps at once, `[27, n]`.

    Args:
      padded: the convolution's inputs, zero-padded by 1 (`_padded`, in memory).
      wide: its output gradient `dout`, zero-padded by 2.

    Returns:
      `[27, n]`, or `[27, n, gates]` for stacked gates (`[gates, b, …]` inputs).

    All 27·n sums are one variadic reduction, which XLA emits as a single loop over the map
    (54 accumulators) instead of 54 passes, and which it does not rewrite into a dot (the
    autodiff of the taps, or of the Conv3d, takes 30-100× longer on CPU). The loop runs over
    `dout`'s own grid (the middle of `wide`) with the shifts on the padded inputs: 1.7× fewer
    steps than the padded grid for a 7×7 map. (One loop per input, 27 accumulators each, was
    faster alone but no faster in a unit: each loop recomputes `dout`, the batch-norm gradient.)
    The loop keeps the first map axis, whose rows XLA:CPU splits between threads (a reduction to
    scalars runs on one), and a small sum over it follows: 1.7-2× faster on 2 cores for the T
    gate's 56×56×64 map, ~20 % off a unit's training step (bench/RESULTS.md §3). It keeps the
    batch axis too, which is the one a mesh shards: a variadic reduction over a sharded axis is
    partitioned as an all-gather per output (54 per gate), one plain sum over it is one
    all-reduce.
    """
    shape = tuple(n - 4 for n in wide.shape[-3:])
    dout = _window(wide, (2, 2, 2), shape)
    operands = tuple(jax.lax.mul(_window(v, tap, shape), dout) for tap in _TAPS for v in padded)
    zeros = tuple(jnp.zeros((), o.dtype) for o in operands)

    def add(a, b):
        return tuple(jax.lax.add(x, y) for x, y in zip(a, b))

    ndim = wide.ndim
    sums = jnp.stack(jax.lax.reduce(operands, zeros, add, (ndim - 2, ndim - 1)))
    # [54, (gates,) b, D1] → [27, n(, gates)].
    gates = wide.shape[:-4]
    return sums.sum(axis=(ndim - 3, ndim - 2)).reshape(len(_TAPS), len(padded), *gates)


def _transposed_taps(wide: jax.Array, weights: jax.Array) -> jax.Array:
    """Input gradient of `_taps` for one input: `Σ_tap w[26 - tap] · pad(dout, 1)[· + tap]`.

    `weights` is `[27]`, or `[27, gates]` for stacked gates.

    Reads `wide` (dout padded by 2) at offset 1, so that it shares the buffer `_kernel_grad`
    reads.
    """
    shape = tuple(n - 4 for n in wide.shape[-3:])
    return _interleaved_sum(
        _scaled(_window(wide, (1 + i, 1 + j, 1 + k), shape), weights, 26 - t)
        for t, (i, j, k) in enumerate(_TAPS)
    )


def gate_conv(p_max: jax.Array, p_mean: jax.Array, kernel: jax.Array) -> jax.Array:
    """The gate's bias-free 2→1-channel 3×3×3 'same' convolution.

    Args:
      p_max, p_mean: the two pooled channels `[b, D1, D2, D3]`.
      kernel: `[3, 3, 3, 2, 1]` over (D1, D2, D3, in, out), i.e. already permuted to the
        order of the pooled map's axes.

    Returns:
      `[b, D1, D2, D3]` in the channels' `compute_dtype` (float32 for bf16 channels), equal to
      `lax.conv_general_dilated` with padding 1. The channels' gradients come back in their
      own dtypes.
    """
    dtype = compute_dtype(p_max.dtype, p_mean.dtype)
    # Cast outside the custom gradient, whose cotangents must have its inputs' dtype: autodiff
    # casts them back. For channels already in `dtype` the casts are no-ops.
    return _gate_conv(p_max.astype(dtype), p_mean.astype(dtype), kernel)


def gate_convs(
    p_maxes: Sequence[jax.Array], p_means: Sequence[jax.Array], kernels: Sequence[jax.Array]
) -> tuple[jax.Array, ...]:
    """`gate_conv` of several gates: `(gate_conv(p_maxes[i], p_means[i], kernels[i]), …)`.

    Stacked gates compute in the `compute_dtype` of all their channels.

    Gates whose pooled maps have one shape (a unit's H and W gates when h = w, which is every
    square crop) are computed stacked, as one set of taps with a weight per gate: the taps are
    most of an attention network's program (bench/RESULTS.md §4, "Compile time"), and one set
    for two gates makes it smaller and is fewer kernels to launch.
    """
    dtype = compute_dtype(*(v.dtype for v in (*p_maxes, *p_means)))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, v in enumerate(p_maxes):
        groups.setdefault(v.shape, []).append(i)
    out: list[jax.Array | None] = [None] * len(p_maxes)
    for members in groups.values():
        if len(members) == 1:
            (i,) = members
            out[i] = gate_conv(p_maxes[i], p_means[i], kernels[i])
            continue
        # `jnp.stack` of a batch-sharded map keeps the batch's sharding (on axis 1).
        stacked = _gate_conv(
            jnp.stack([p_maxes[i].astype(dtype) for i in members]),
            jnp.stack([p_means[i].astype(dtype) for i in members]),
            jnp.stack([kernels[i] for i in members]),
        )
        for n, i in enumerate(members):
            out[i] = stacked[n]
    return tuple(out)


def _tap_weights(kernel: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """The kernel `[3, 3, 3, 2, 1]` as `[27, 2]` tap weights; stacked `[gates, 3, 3, 3, 2, 1]`
    as `[27, 2, gates]`."""
    if kernel.ndim == 5:
        return kernel.reshape(27, 2).astype(dtype)
    return jnp.transpose(kernel.reshape(-1, 27, 2), (1, 2, 0)).astype(dtype)


def _pad_map(v: jax.Array, width: int) -> jax.Array:
    return jnp.pad(v, ((0, 0),) * (v.ndim - 3) + ((width, width),) * 3)


@jax.custom_vjp
def _gate_conv(p_max: jax.Array, p_mean: jax.Array, kernel: jax.Array) -> jax.Array:
    """`gate_conv` for channels of one dtype, float32 or wider; with a leading gate axis on all
    three (`[gates, b, D1, D2, D3]`, `[gates, 3, 3, 3, 2, 1]`), of stacked gates."""
    # Not differentiated (inference), the output's users are the gate's batch norm with running
    # statistics and its sigmoid: elementwise, they fuse into the taps' loop, and XLA writes the
    # sigmoid once (it does not fuse an expensive op into the product that broadcasts it). The
    # tricks `_gate_conv_fwd` needs for the gradient would only add kernels here: 20 of the 45
    # in a CinST unit's inference, and 5-10 % of its time (bench/RESULTS.md §3, 2026-12-05).
    padded = (_pad_map(p_max, 1), _pad_map(p_mean, 1))
    return _taps(padded, _tap_weights(kernel, p_max.dtype))


def _gate_conv_fwd(p_max, p_mean, kernel):
    # The padded inputs are kept for the kernel gradient: padded again there, the padding would
    # be fused into its loop as a bounds check on each of the 27 reads of every element.
    padded = (_padded(p_max, 1, kernel), _padded(p_mean, 1, kernel))
    out = _taps(padded, _tap_weights(kernel, p_max.dtype))
    # Materialized along D1: the batch axis (0, or 1 when stacked) is the one a mesh shards.
    return materialize(out, kernel, axis=out.ndim - 3), (padded, kernel)


def _gate_conv_bwd(res, dout):
    padded, kernel = res
    dtype = padded[0].dtype
    w = _tap_weights(kernel, dtype)
    # A wider cotangent than the output can arrive (a float32 gate in a float64 network).
    wide = _padded(dout.astype(dtype), 2, kernel)
    d_max = _transposed_taps(wide, w[:, 0])
    d_mean = _transposed_taps(wide, w[:, 1])
    dk = _kernel_grad(padded, wide)
    if kernel.ndim == 6:
        dk = jnp.transpose(dk, (2, 0, 1))
    return d_max, d_mean, dk.reshape(kernel.shape).astype(kernel.dtype)


_gate_conv.defvjp(_gate_conv_fwd, _gate_conv_bwd)


# --- the gate's batch norm -----------------------------------------------------------------


def _sums(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`Σ a` and `Σ b` over every axis but the last, as one variadic reduction (one loop).

    The loop keeps the batch axis, which a plain sum of both results then reduces: over a
    sharded batch that is one all-reduce, where a variadic reduction is partitioned as an
    all-gather per output.
    """
    zero = jnp.zeros((), a.dtype)
    axes = tuple(range(1, a.ndim - 1))
    per_clip = jax.lax.reduce((a, b), (zero, zero), lambda p, q: (p[0] + q[0], p[1] + q[1]), axes)
    total = jnp.stack(per_clip).sum(axis=1)
    return total[0], total[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch norm over every axis but the last: `(y, batch mean, batch var)`.

    The same function as `nn.BatchNorm` (biased variance as `E[x²] - E[x]²`, clipped at 0),
    with the statistics and, in the gradient, `Σdy` and `Σdy·x̂` each as one variadic reduction:
    a gate's norm is then 2 loops forward and 2 back, where autodiff of `nn.BatchNorm` gives
    XLA:CPU about 10 small kernels (at batch 1 each costs more to launch than to run).
    """
    return _batch_norm_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_fwd(x, scale, bias, epsilon):
    n = x.size // x.shape[-1]
    total, squares = _sums(x, x * x)
    mean = total / n
    var = jnp.maximum(0.0, squares / n - mean * mean)
    inv = jax.lax.rsqrt(var + epsilon)
    y = (x - mean) * (inv * scale) + bias
    return (y, mean, var), (x, mean, inv, scale)


def _batch_norm_bwd(epsilon, res, cts):
    del epsilon
    x, mean, inv, scale = res
    dy, dmean, dvar = cts
    n = x.size // x.shape[-1]
    centred = x - mean
    x_hat = centred * inv
    dbias, dscale = _sums(dy, dy * x_hat)
    dx = (inv * scale / n) * (n * dy - dbias - x_hat * dscale)
    # The batch statistics are outputs too (the running averages); usually their cotangent is 0.
    # (A batch of 0 clips has n = 0 and an empty dx: any factor serves, but Python's 2 / 0 fails.)
    dx = dx + dmean / n + dvar * (2 / max(n, 1)) * centred
    return dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


# --- applying the gates ---------------------------------------------------------------------


def _combined(gates: Sequence[jax.Array], axes: Sequence[int], weights: Sequence[float]):
    total = None
    for g, a, w in zip(gates, axes, weights, strict=True):
        term = _expand(g, a) * np.asarray(w, g.dtype)
        total = term if total is None else total + term
    return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def gate_product(
    x: jax.Array, gates: tuple[jax.Array, ...], axes: tuple[int, ...], weights: tuple[float, ...]
) -> jax.Array:
    """`x · Σ_i weights[i] · gates[i]`, gate i broadcast along `axes[i]` (the axis it pooled).

    Args:
      x: the map, any float dtype; the result has its dtype.
      gates: the gates (`compute_dtype`), each shaped as `x` without `axes[i]`.
      axes: the axis of `x` each gate is broadcast along.
      weights: the static weight of each gate (1, or 1/3 for the ST average).
    """
    return x * _combined(gates, axes, weights).astype(x.dtype)


def _gate_product_fwd(x, gates, axes, weights):
    return gate_product(x, gates, axes, weights), (x, gates)


def _gate_product_bwd(axes, weights, res, dout):
    x, gates = res
    dx = dout * _combined(gates, axes, weights).astype(dout.dtype)
    dgates = tuple(
        _reduce_product(dout, x, a) * np.asarray(w, g.dtype)
        for a, w, g in zip(axes, weights, gates, strict=True)
    )
    return dx, tuple(d.astype(g.dtype) for d, g in zip(dgates, gates, strict=True))


gate_product.defvjp(_gate_product_fwd, _gate_product_bwd)
