"""`layers.Conv`, `layers.max_pool` and `layers.BatchNorm` equal `nn.Conv`, `nn.max_pool` and
`nn.BatchNorm` in value and gradient (`BatchNorm` moves its running variance as PyTorch does)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aia_jax.models import layers


def _normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _value_and_grads(module, variables, x, dout):
    y, vjp = jax.vjp(lambda v, x: module.apply(v, x), variables, x)
    return y, vjp(dout)


CONVS = {
    # name: (input shape, kernel size, strides, padding)
    "1x1": ((2, 5, 6, 7), (1, 1), (1, 1), "VALID"),
    "1x1-explicit-zero-pad": ((2, 5, 6, 7), (1, 1), (1, 1), ((0, 0), (0, 0))),
    "1x1-stride2": ((2, 7, 6, 5), (1, 1), (2, 2), "VALID"),
    "3x3-stride2-pad1": ((2, 9, 8, 5), (3, 3), (2, 2), ((1, 1), (1, 1))),
    "1x1x1-3d": ((2, 3, 5, 4, 6), (1, 1, 1), (1, 1, 1), "VALID"),
    "1x1x1-3d-stride": ((2, 3, 5, 4, 6), (1, 1, 1), (1, 2, 2), "VALID"),
    "3x1x1-3d": ((2, 4, 5, 4, 6), (3, 1, 1), (1, 1, 1), ((1, 1), (0, 0), (0, 0))),
}


@pytest.mark.parametrize("case", list(CONVS))
def test_conv_equals_flax_conv(case):
    shape, kernel_size, strides, padding = CONVS[case]
    kw = dict(kernel_size=kernel_size, strides=strides, padding=padding)
    ours, theirs = layers.Conv(4, **kw), nn.Conv(4, use_bias=False, **kw)
    x = _normal(0, shape)
    variables = ours.init(jax.random.key(0), x)
    # Same parameter tree and the same initial values from the same key.
    ref_variables = theirs.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, ref_variables)
    np.testing.assert_array_equal(variables["params"]["kernel"], ref_variables["params"]["kernel"])
    dout = _normal(1, theirs.apply(variables, x).shape)
    (y, grads), (y_ref, grads_ref) = (
        _value_and_grads(m, variables, x, dout) for m in (ours, theirs)
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [(1, 1), (3, 3)], ids=str)
def test_conv_computes_in_dtype_and_keeps_param_dtype(kernel_size):
    x = _normal(2, (2, 4, 4, 8))
    conv = layers.Conv(4, kernel_size, padding="SAME", dtype=jnp.bfloat16)
    variables = conv.init(jax.random.key(0), x)
    assert variables["params"]["kernel"].dtype == jnp.float32
    assert conv.apply(variables, x).dtype == jnp.bfloat16
    grads = jax.grad(lambda v: conv.apply(v, x).astype(jnp.float32).sum())(variables)
    assert grads["params"]["kernel"].dtype == jnp.float32


POOLS = {
    "2d-stem": ((2, 9, 10, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),
    "3d-stem": ((2, 3, 9, 8, 3), (1, 3, 3), (1, 2, 2), ((0, 0), (1, 1), (1, 1))),
    "2d-unpadded": ((1, 7, 7, 2), (2, 3), (1, 2), ((0, 0), (0, 0))),
}


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("case", list(POOLS))
def test_max_pool_equals_flax_max_pool(case, ties):
    shape, window, strides, padding = POOLS[case]
    rng = np.random.default_rng(3)
    # Small integers tie within most windows: the gradient must still go to one element.
    x = rng.integers(-2, 3, size=shape) if ties else rng.normal(size=shape)
    x = jnp.asarray(x, jnp.float32)
    ours = functools.partial(layers.max_pool, window=window, strides=strides, padding=padding)
    theirs = functools.partial(nn.max_pool, window_shape=window, strides=strides, padding=padding)
    y, vjp = jax.vjp(ours, x)
    y_ref, vjp_ref = jax.vjp(theirs, x)
    np.testing.assert_array_equal(y, y_ref)
    dout = _normal(4, y.shape)
    np.testing.assert_allclose(vjp(dout)[0], vjp_ref(dout)[0], rtol=1e-6, atol=1e-6)
    # Every output's gradient lands on exactly one input.
    np.testing.assert_allclose(vjp(jnp.ones_like(y))[0].sum(), y.size, rtol=1e-6)


def test_max_pool_bf16():
    x = _normal(5, (2, 9, 10, 3), jnp.bfloat16)
    args = dict(window=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    y = layers.max_pool(x, **args)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        y, nn.max_pool(x, args["window"], strides=args["strides"], padding=args["padding"])
    )
    assert jax.grad(lambda x: layers.max_pool(x, **args).sum())(x).dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("use_running_average", [False, True])
def test_batch_norm_equals_flax_batch_norm(dtype, use_running_average):
    """Output, gradients (parameters and input) and running mean bit for bit; the running
    variance moved by the unbiased batch variance, as `torch.nn.BatchNorm2d` moves it."""
    kw = dict(use_running_average=use_running_average, momentum=0.9, epsilon=1e-5, dtype=dtype)
    ours, theirs = layers.BatchNorm(**kw), nn.BatchNorm(**kw)
    x = (_normal(0, (2, 3, 5, 6)) * 3 + 1).astype(dtype)
    variables = theirs.init(jax.random.key(0), x)
    variables = jax.tree.map(lambda a: a + jnp.abs(_normal(1, a.shape)), variables)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)
    dout = _normal(2, x.shape).astype(dtype)

    def run(module):
        def f(v, x):
            return module.apply(v, x, mutable=["batch_stats"])

        (y, stats), vjp = jax.vjp(f, variables, x)
        grads = vjp((dout, jax.tree.map(jnp.zeros_like, stats)))
        return y, stats["batch_stats"], grads

    y, stats, grads = jax.jit(lambda: run(ours))()
    want_y, want_stats, want_grads = jax.jit(lambda: run(theirs))()
    assert y.dtype == want_y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want_y, np.float32))
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(stats["mean"], want_stats["mean"])
    old = np.asarray(variables["batch_stats"]["var"], np.float64)
    if use_running_average:
        np.testing.assert_array_equal(stats["var"], old)
    else:
        batch = np.asarray(x, np.float64).reshape(-1, x.shape[-1]).var(axis=0, ddof=1)
        np.testing.assert_allclose(stats["var"], 0.9 * old + 0.1 * batch, rtol=1e-5)


def test_batch_norm_of_one_value_per_channel_keeps_the_biased_variance():
    """n = 1 has no unbiased variance (PyTorch refuses to train on it): 0 is used, not inf."""
    module = layers.BatchNorm()
    x = _normal(0, (1, 4))
    variables = module.init(jax.random.key(0), x)
    _, stats = module.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(stats["batch_stats"]["var"], 0.9)
