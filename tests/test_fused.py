"""The fused gate primitives equal the plain XLA formulation in value and gradient (float32;
bf16 ties under jit and a sharded batch included)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aia_jax import models
from aia_jax.models import attention, fused, layers
from aia_jax.models.attention import PLACEMENTS, UNIT_GATES, pool_max_mean

SHAPE = (2, 3, 5, 4, 6)  # [b, t, h, w, c], all different so any axis mix-up shows


def _normal(seed: int, shape, dtype=jnp.float32) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _close(got, want, rtol=1e-5, atol=1e-6, err_msg=""):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), rtol, atol, err_msg=err_msg
        )


def _ref_pool(x, axes):
    return tuple((pool_max_mean(x, a)[..., 0], pool_max_mean(x, a)[..., 1]) for a in axes)


@pytest.mark.parametrize("axes", [(1,), (4,), (1, 2, 3), (1, 2, 3, 4)], ids=str)
def test_pool_value_and_gradient(axes):
    x = _normal(0, SHAPE)
    cts = jax.tree_util.tree_map(lambda s: _normal(1, s.shape), _ref_pool(x, axes))

    def loss(f, x):
        leaves = zip(jax.tree_util.tree_leaves(f(x, axes)), jax.tree_util.tree_leaves(cts))
        return sum(jnp.vdot(a, b) for a, b in leaves)

    _close(fused.pool(x, axes), _ref_pool(x, axes))
    _close(jax.grad(lambda x: loss(fused.pool, x))(x), jax.grad(lambda x: loss(_ref_pool, x))(x))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
def test_pool_over_long_axes_reduces_in_chunks(dtype):
    # 16 frames and 12 rows reduce in two stages (chunks of 8 and 6), 11 columns in one: the
    # value (inference, jitted as a network runs it) and the gradient, ties included.
    x = jnp.asarray(np.random.default_rng(7).integers(-4, 0, size=(2, 16, 12, 11, 3)), dtype)
    axes = (1, 2, 3, 4)
    want = _ref_pool(x, axes)
    for got in (fused.pool(x, axes), jax.jit(fused.pool, static_argnums=1)(x, axes)):
        _close(got, want)
        for (mx, _), (ref_mx, _) in zip(got, want, strict=True):
            assert mx.dtype == jnp.float32 and np.array_equal(mx, ref_mx.astype(jnp.float32))

    def loss(f, x):
        return sum(jnp.sum(m * (i + 1)) + jnp.sum(a * a) for i, (m, a) in enumerate(f(x, axes)))

    # The reference's bf16 gradient rounds in bf16; this one's stays float32 until the end.
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == jnp.float32 else {"rtol": 2e-2, "atol": 2e-2}
    got, want = (jax.grad(lambda x, f=f: loss(f, x))(x) for f in (fused.pool, _ref_pool))
    _close(got, want, **tol)


def test_pool_ties_share_the_gradient_like_jnp_max():
    # Integer-valued map: many ties along every axis.
    x = jnp.asarray(np.random.default_rng(2).integers(0, 3, size=SHAPE), jnp.float32)
    axes = (1, 2, 3, 4)
    want = jax.grad(
        lambda x: sum(jnp.sum(m * (i + 1)) for i, (m, _) in enumerate(_ref_pool(x, axes)))
    )(x)
    got = jax.grad(
        lambda x: sum(jnp.sum(m * (i + 1)) for i, (m, _) in enumerate(fused.pool(x, axes)))
    )(x)
    _close(got, want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__)
def test_pool_gradient_under_jit_is_one_per_max_in_low_precision(dtype):
    # A gated low-precision map, as in a unit: under jit XLA may compute the product in float32
    # without rounding it (excess precision). Each pooled max must still pass on exactly its
    # cotangent, as it does eagerly: before the fix, 1-4 of ~1000 maxima passed on twice theirs.
    x = _normal(3, (2, 4, 8, 8, 16), dtype)
    gate = jax.nn.sigmoid(_normal(4, (2, 4, 8, 8)))  # a C gate: the map without c

    def mass(x, gate, axis):
        z = fused.gate_product(x, (gate,), (4,), (1.0,))
        m, vjp = jax.vjp(lambda z: fused.pool(z, (axis,))[0][0], z)
        (dz,) = vjp(jnp.ones_like(m))
        return jnp.sum(dz.astype(jnp.float32), axis=axis)

    for axis in (1, 2, 3, 4):
        for name, f in (("eager", mass), ("jit", jax.jit(mass, static_argnums=2))):
            got = np.asarray(f(x, gate, axis))
            np.testing.assert_array_equal(got, np.ones_like(got), err_msg=f"axis {axis}, {name}")


def _lax_conv(p_max, p_mean, kernel):
    pooled = jnp.stack([p_max, p_mean], axis=-1)
    out = jax.lax.conv_general_dilated(
        pooled, kernel, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )
    return out[..., 0]


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 1, 1, 1), (1, 7, 2, 9)], ids=str)
def test_gate_conv_value_and_gradient(shape):
    p_max, p_mean, dout = _normal(3, shape), _normal(4, shape), _normal(5, shape)
    # A first weight of -1 or less anchors `fused.materialize` at a negative start, which once
    # shifted the training pass's output by one along D1.
    kernel = _normal(6, (3, 3, 3, 2, 1)).at[0, 0, 0, 0, 0].set(-1.5)
    want = _lax_conv(p_max, p_mean, kernel)
    _close(fused.gate_conv(p_max, p_mean, kernel), want, 1e-5, 1e-5)
    out, vjp_fused = jax.vjp(fused.gate_conv, p_max, p_mean, kernel)
    _close(out, want, 1e-5, 1e-5)
    _, vjp_ref = jax.vjp(_lax_conv, p_max, p_mean, kernel)
    _close(vjp_fused(dout), vjp_ref(dout), 1e-5, 1e-5)


def test_gate_convs_stacks_gates_of_one_shape_and_equals_each_gate_alone():
    # Gates 1 and 3 share a shape and are computed stacked (one custom-gradient call for both);
    # gate 2 alone. Each result and gradient equals its gate's own `gate_conv`, under jit too.
    shapes = [(2, 3, 5, 4), (2, 3, 4, 5), (2, 3, 5, 4)]
    p_max = [_normal(20 + i, s) for i, s in enumerate(shapes)]
    p_mean = [_normal(30 + i, s) for i, s in enumerate(shapes)]
    kernels = [_normal(40 + i, (3, 3, 3, 2, 1)).at[0, 0, 0, 0, 0].set(-1.5) for i in range(3)]
    douts = tuple(_normal(50 + i, s) for i, s in enumerate(shapes))

    def each(a, b, k):
        return tuple(fused.gate_conv(*args) for args in zip(a, b, k, strict=True))

    jaxpr = jax.make_jaxpr(fused.gate_convs)(p_max, p_mean, kernels)
    assert str(jaxpr).count("custom_vjp_call") == 2
    out, vjp = jax.vjp(fused.gate_convs, p_max, p_mean, kernels)
    want, vjp_ref = jax.vjp(each, p_max, p_mean, kernels)
    _close(out, want, 1e-6, 1e-6)
    _close(vjp(douts), vjp_ref(douts), 1e-6, 1e-6)
    jitted = jax.jit(lambda *a: jax.vjp(fused.gate_convs, *a)[1](douts))
    _close(jitted(p_max, p_mean, kernels), vjp_ref(douts), 1e-5, 1e-5)
    _close(jax.jit(fused.gate_convs)(p_max, p_mean, kernels), want, 1e-6, 1e-6)


@pytest.mark.parametrize("anchor", [-3.7, -1.0, -0.5, 0.0, 2.0, np.nan, -np.inf, np.inf])
def test_materialize_returns_the_map_whatever_the_anchor(anchor):
    x = _normal(2, (2, 3, 4, 5))
    a = jnp.full((3,), anchor, jnp.float32)
    for f in (fused.materialize, jax.jit(fused.materialize)):
        np.testing.assert_array_equal(f(x, a), x)


@pytest.mark.parametrize("dtypes", [("bfloat16",) * 2, ("float32", "bfloat16")], ids=str)
def test_gate_conv_of_bf16_channels_computes_in_float32(dtypes):
    # The taps run in float32 and each channel's gradient comes back in its own dtype: exactly
    # the float32 convolution of the same values, its gradients rounded to that dtype.
    p_max, p_mean = (_normal(3 + i, (1, 2, 3, 4)).astype(d) for i, d in enumerate(dtypes))
    kernel, dout = _normal(6, (3, 3, 3, 2, 1)), _normal(5, (1, 2, 3, 4))
    wide = tuple(v.astype(jnp.float32) for v in (p_max, p_mean))
    out, vjp = jax.vjp(fused.gate_conv, p_max, p_mean, kernel)
    want, vjp_want = jax.vjp(fused.gate_conv, *wide, kernel)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, want)
    for got, exact, channel in zip(vjp(dout), vjp_want(dout), (p_max, p_mean, kernel)):
        assert got.dtype == channel.dtype
        np.testing.assert_array_equal(got, exact.astype(channel.dtype))


@pytest.mark.parametrize("chains", [1, 2, 3, 4, 5])
def test_interleaved_sum_adds_every_term_once(chains):
    # Powers of two are exact in float32, so any order gives the same sum; a term lost or
    # added twice does not.
    for n in range(1, 12):
        terms = [jnp.full((2,), 2.0**k, jnp.float32) for k in range(n)]
        np.testing.assert_array_equal(fused._interleaved_sum(terms, chains), 2.0**n - 1)


@pytest.mark.parametrize(
    "axes,weights", [((4,), (1.0,)), ((1, 2, 3), (1 / 3,) * 3), ((1,), (1.0,))], ids=str
)
def test_gate_product_value_and_gradient(axes, weights):
    x, dout = _normal(7, SHAPE), _normal(8, SHAPE)
    gates = tuple(jax.nn.sigmoid(_normal(9 + i, np.delete(SHAPE, a))) for i, a in enumerate(axes))

    def ref(x, gates):
        return x * sum(w * jnp.expand_dims(g, a) for g, a, w in zip(gates, axes, weights))

    _close(fused.gate_product(x, gates, axes, weights), ref(x, gates))
    _, vjp_fused = jax.vjp(lambda x, g: fused.gate_product(x, g, axes, weights), x, gates)
    _, vjp_ref = jax.vjp(ref, x, gates)
    _close(vjp_fused(dout), vjp_ref(dout))


@pytest.mark.parametrize("features", [1, 3])
def test_gate_norm_equals_the_backbone_batch_norm(features):
    """Value, new running statistics and the gradient of all three (the statistics' cotangents
    included, which a training step never sends) against `layers.BatchNorm` (`nn.BatchNorm`
    with PyTorch's running variance), train and eval."""
    x = 3 * _normal(20, (2, 3, 4, 5, features)) + 1
    ref = layers.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    new = attention.GateNorm()
    variables = ref.init(jax.random.key(0), x)
    assert jax.tree_util.tree_map(jnp.shape, new.init(jax.random.key(0), x, train=True)) == (
        jax.tree_util.tree_map(jnp.shape, variables)
    )
    variables = jax.tree_util.tree_map(lambda v: v + 0.5 * _normal(21, v.shape), variables)
    probe = _normal(22, x.shape)

    def loss(apply, params, x):
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        y, upd = apply(v, x)
        stats = upd["batch_stats"]
        return jnp.vdot(y, probe) + 3 * stats["mean"].sum() - 2 * stats["var"].sum(), (y, upd)

    def train_ref(v, x):
        return ref.apply(v, x, mutable=["batch_stats"])

    def train_new(v, x):
        return new.apply(v, x, train=True, mutable=["batch_stats"])

    got = jax.value_and_grad(functools.partial(loss, train_new), (0, 1), has_aux=True)
    want = jax.value_and_grad(functools.partial(loss, train_ref), (0, 1), has_aux=True)
    _close(got(variables["params"], x), want(variables["params"], x), 1e-5, 1e-5)
    _close(
        new.apply(variables, x, train=False),
        layers.BatchNorm(use_running_average=True, epsilon=1e-5).apply(variables, x),
    )


def _variables(module, x, seed=0):
    variables = module.init(jax.random.key(seed), x, train=False)
    # Non-trivial BN statistics and affine parameters in every gate.
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [
        jnp.abs(v) + 0.5 + 0.3 * jax.random.uniform(k, v.shape) if v.ndim == 1 else v
        for k, v in zip(keys, leaves)
    ]
    return jax.tree_util.tree_unflatten(tree, leaves)


def _unit_pair(module_cls, name, x, train):
    fast, plain = module_cls(name, impl="fused"), module_cls(name, impl="xla")
    variables = _variables(plain, x)
    assert jax.tree_util.tree_structure(fast.init(jax.random.key(0), x, train=False)) == (
        jax.tree_util.tree_structure(variables)
    )

    def run(module):
        def f(params, x):
            v = {"params": params, "batch_stats": variables["batch_stats"]}
            if train:
                y, upd = module.apply(v, x, train=True, mutable=["batch_stats"])
                return y, upd
            return module.apply(v, x, train=False), {}

        y, vjp, upd = jax.vjp(f, variables["params"], x, has_aux=True)
        return y, upd, vjp(_normal(11, x.shape))

    return run(fast), run(plain)


# h = w stacks the H and W gates' convolutions (`fused.gate_convs`), t = h = w = c all three of
# T, H and W; the C unit has one gate, nothing to stack.
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(
    "unit, shape",
    [(u, SHAPE) for u in UNIT_GATES]
    + [(u, s) for u in UNIT_GATES if u != "C" for s in [(2, 3, 5, 5, 6), (2, 4, 4, 4, 4)]],
    ids=str,
)
def test_unit_fused_equals_xla(unit, train, shape):
    x = _normal(10, shape)
    (y_f, upd_f, grads_f), (y_x, upd_x, grads_x) = _unit_pair(models.AttentionUnit, unit, x, train)
    _close(y_f, y_x, err_msg="value")
    _close(upd_f, upd_x, err_msg="batch_stats")
    _close(grads_f, grads_x, 1e-4, 1e-5, err_msg="gradient")


@pytest.mark.parametrize("unit", list(UNIT_GATES))
def test_unit_fused_equals_xla_in_float64(unit):
    # A float64 network's gates compute in float64 with either impl (fused.compute_dtype), so the
    # two agree to float64 rounding in value, batch statistics and every gradient: a pool, a
    # convolution or a sigmoid left in float32 would differ by ~1e-7. The maxima must also be
    # found in float64: pooled in float32 they equal no element and the max-pool gradient is lost.
    with jax.enable_x64(True):
        x = _normal(16, SHAPE, jnp.float64)
        make = lambda impl: models.AttentionUnit(  # noqa: E731
            unit, dtype=jnp.float64, param_dtype=jnp.float64, impl=impl
        )
        variables = _variables(make("xla"), x)

        def run(impl):
            def f(params, x):
                y, upd = make(impl).apply(
                    {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
                )
                return jnp.sum(y * jnp.cos(x)), (y, upd)

            grad_fn = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
            (_, (y, upd)), grads = grad_fn(variables["params"], x)
            return y, upd, grads

        got, want = run("fused"), run("xla")
        for g, w in zip(
            jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True
        ):
            assert g.dtype == w.dtype
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-10, atol=1e-12)
        assert got[0].dtype == got[2][1].dtype == jnp.float64


def test_fused_float32_unit_under_x64():
    # With x64 on, a float64 cotangent can reach the float32 gate convolution's gradient.
    with jax.enable_x64(True):
        x = _normal(10, SHAPE)
        (_, _, g_f), (_, _, g_x) = _unit_pair(models.AttentionUnit, "CinST", x, True)
        _close(g_f, g_x, 1e-4, 1e-5, err_msg="gradient")


@pytest.mark.parametrize("impl", attention.IMPLS)
def test_unit_gradient_under_jit_is_the_unfused_programs(impl):
    # The max pools' gradient compares the map with its maxima. XLA:CPU (jaxlib 0.10.2) fused
    # the map's producer (here a batch norm) into the forward reduction and into that
    # comparison, and the two copies rounded differently: maxima were not found again and their
    # gradient was lost (0.2-0.9 of this gradient; 0.5-15 % of whole networks'). Float64, so that
    # a difference is not float32 rounding; against the same program compiled without fusion.
    with jax.enable_x64(True):
        unit = models.AttentionUnit("CinST", dtype=jnp.float64, param_dtype=jnp.float64, impl=impl)
        x = _normal(1, (2, 8, 7, 8, 64), jnp.float64)
        weights = _normal(3, x.shape, jnp.float64)
        variables = _variables(unit, x)

        def loss(params, x):
            normed = (x - x.mean((0, 1, 2, 3))) * jax.lax.rsqrt(x.var((0, 1, 2, 3)) + 1e-5)
            v = {**variables, "params": params}
            y, _ = unit.apply(v, normed, train=True, mutable=["batch_stats"])
            return jnp.sum(y * weights)

        lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables["params"], x)
        got = lowered.compile()(variables["params"], x)
        want = lowered.compile({"xla_disable_hlo_passes": "fusion"})(variables["params"], x)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9 * np.abs(w).max())


@pytest.mark.parametrize("placement", [p for p in PLACEMENTS if p != "none"])
def test_placement_fused_equals_xla_in_training(placement):
    x = _normal(12, (1, 4, 6, 6, 16))
    (y_f, upd_f, grads_f), (y_x, upd_x, grads_x) = _unit_pair(models.Attention, placement, x, True)
    _close(y_f, y_x, err_msg="value")
    _close(upd_f, upd_x, err_msg="batch_stats")
    _close(grads_f, grads_x, 1e-4, 1e-5, err_msg="gradient")


@pytest.mark.parametrize(
    ("unit", "train"), [("C", False), ("CinST", True)], ids=["C-eval", "CinST-train"]
)
def test_gradient_of_gradient_fused_equals_xla(unit, train):
    # A gradient penalty or a meta-learning step differentiates the backward pass, so the
    # pool's forward pass is differentiated too (a custom JVP: JAX's own derivative of the
    # max/count/sum reduction fails on the count's constant operand).
    x = _normal(17, (1, 4, 6, 6, 16))
    make = lambda impl: models.AttentionUnit(unit, impl=impl)  # noqa: E731
    variables = _variables(make("xla"), x)

    def second_order(impl):
        def loss(params, x):
            v = {"params": params, "batch_stats": variables["batch_stats"]}
            if train:
                y, _ = make(impl).apply(v, x, train=True, mutable=["batch_stats"])
            else:
                y = make(impl).apply(v, x, train=False)
            return jnp.sum(y * jnp.cos(x))

        def penalty(params, x):
            g_params, g_x = jax.grad(loss, (0, 1))(params, x)
            squares = jax.tree_util.tree_map(lambda g: jnp.sum(g**2), g_params)
            return sum(jax.tree_util.tree_leaves(squares)) + jnp.sum(g_x**2)

        return jax.jit(jax.grad(penalty, (0, 1)))(variables["params"], x)

    got, want = second_order("fused"), second_order("xla")
    # Second derivatives reach the hundreds here: float32 rounding is relative to the largest.
    scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree_util.tree_leaves(want))
    _close(got, want, 1e-4, 1e-6 * scale)


def test_bf16_fused_is_close_to_xla():
    x = _normal(13, SHAPE, jnp.bfloat16)
    make = lambda impl: models.AttentionUnit("CinST", dtype=jnp.bfloat16, impl=impl)  # noqa: E731
    variables = _variables(make("xla"), x)
    y_f = make("fused").apply(variables, x, train=False)
    y_x = make("xla").apply(variables, x, train=False)
    assert y_f.dtype == y_x.dtype == jnp.bfloat16
    _close(y_f, y_x, 2e-2, 2e-2)


def test_impls_share_parameters():
    assert models.AttentionUnit("C").impl == attention.DEFAULT_IMPL in attention.IMPLS
    x = _normal(14, SHAPE)

    def shapes(impl):
        module = models.Attention("STinCplusCinST", impl=impl)
        return jax.tree_util.tree_map(jnp.shape, module.init(jax.random.key(0), x, train=False))

    assert shapes("fused") == shapes("xla")


def test_i3d_block_fused_equals_xla_in_training():
    # The 3D form hands the attention its map as it is ([B, T, H, W, C], no reshape). The 2D
    # forms' whole networks are checked against the PyTorch reference's gradients
    # (test_parity.py); the release has no 3D form, so the plain formulation is the reference.
    make = functools.partial(models.Bottleneck, planes=4, form="I3D", num_segments=4, inflate=True)
    block = make(attention="STinCplusCinST")
    x = _normal(15, (2, 4, 6, 6, 16))
    (y_f, u_f, g_f), (y_x, u_x, g_x) = _unit_pair(
        lambda placement, impl: make(attention=placement, attention_impl=impl),
        block.attention,
        x,
        True,
    )
    _close(y_f, y_x, err_msg="value")
    _close(u_f, u_x, err_msg="batch_stats")
    # Judged against each leaf's scale: the block's conv kernels' gradients reach ~90, where
    # float32 rounding alone moves an entry by ~6e-5 (the plain formulation differs from its
    # float64 evaluation by that much), more than a fixed atol of 1e-5 allows.
    for g, w in zip(jax.tree_util.tree_leaves(g_f), jax.tree_util.tree_leaves(g_x), strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        _close(g, w, 1e-4, max(1e-5, 1e-6 * scale), err_msg="gradient")


def test_sharded_unit_needs_no_all_gathers():
    # Over a batch sharded across devices, every batch sum of the fused path (kernel gradients,
    # batch-norm statistics and their gradients) must be one all-reduce: a variadic reduction
    # over the sharded axis was partitioned into one all-gather per output (232 per unit).
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = _normal(5, (jax.device_count(), 4, 8, 8, 16))
    unit = models.AttentionUnit("CinST")
    variables = unit.init(jax.random.key(0), x, train=False)

    def loss(params, x):
        y, _ = unit.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y * y)

    shardings = (NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data")))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), in_shardings=shardings)
    hlo = grad.lower(variables["params"], x).compile().as_text()
    assert "all-gather" not in hlo
    assert 0 < hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(") <= 16
    got = grad(variables["params"], x)
    want = jax.grad(loss, argnums=(0, 1))(variables["params"], x)
    # Sums in another order: judged against each leaf's scale (gate gradients reach ~2000).
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(np.abs(w).max()))

    # Inference pools over every axis but the batch: no collective at all.
    infer = jax.jit(functools.partial(unit.apply, train=False), in_shardings=shardings)
    hlo = infer.lower(variables, x).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" not in hlo
    _close(infer(variables, x), unit.apply(variables, x, train=False))
