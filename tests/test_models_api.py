"""The model modules as a user meets them: argument checks, clear errors, forward mode, docs."""

import inspect
import re

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aia_jax import models

KEY = jax.random.key(0)


def _init(module, x, **kw):
    return jax.eval_shape(lambda x: module.init(KEY, x, **kw), x)


def _struct(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_unknown_shift_place_is_rejected_not_ignored():
    # A misspelt shift_place used to give a network without any shift (a plain C2D).
    for module in (
        models.ResNet(depth=14, width=8, form="TSM", num_segments=2, shift_place="blok"),
        models.VideoNet(
            num_classes=3, form="TSM", num_segments=2, depth=14, width=8, shift_place="blok"
        ),
    ):
        shape = (2, 32, 32, 3) if isinstance(module, models.ResNet) else (1, 2, 32, 32, 3)
        with pytest.raises(ValueError, match="shift_place must be 'blockres' or 'block'"):
            _init(module, _struct(shape), train=False)
    block = models.Bottleneck(planes=2, form="TSM", num_segments=2, shift=True, shift_place="x")
    with pytest.raises(ValueError, match="shift_place must be 'blockres' or 'block'"):
        _init(block, _struct((2, 4, 4, 8)), train=False)


def test_bottleneck_names_wrongly_shaped_inputs():
    tsm = models.Bottleneck(
        planes=4, form="TSM", num_segments=4, attention="CinST", shift=True, downsample=True
    )
    with pytest.raises(ValueError, match="6 frames are not whole clips of num_segments=4"):
        _init(tsm, _struct((6, 8, 8, 16)), train=False)
    with pytest.raises(ValueError, match=r"frames \[B\*T, H, W, C\] expected"):
        _init(tsm, _struct((2, 4, 8, 8, 16)), train=False)
    i3d = models.Bottleneck(planes=4, form="I3D", attention="C", downsample=True)
    with pytest.raises(ValueError, match=r"clips \[B, T, H, W, C\] expected"):
        _init(i3d, _struct((4, 8, 8, 16)), train=False)
    plain = models.Bottleneck(planes=4)
    with pytest.raises(ValueError, match="16 input channels.*8 given"):
        _init(plain, _struct((8, 8, 8, 8)), train=False)
    # The right shapes still work; a C2D block without attention takes any number of frames.
    assert _init(tsm, _struct((8, 8, 8, 16)), train=False)
    assert _init(models.Bottleneck(planes=4, downsample=True), _struct((3, 8, 8, 8)), train=False)


def test_gate_conv_checks_its_gate_and_pooled_shape():
    for impl in models.IMPLS:
        with pytest.raises(ValueError, match="unknown gate 'X'"):
            _init(models.GateConv("X", impl=impl), _struct((2, 2, 8, 8, 2)))
        # The fused form used to drop a third channel silently, and fail deep inside on 4-D.
        with pytest.raises(ValueError, match=r"pooled context \[b, D1, D2, D3, 2\] expected"):
            _init(models.GateConv("C", impl=impl), _struct((2, 2, 8, 8, 3)))
        with pytest.raises(ValueError, match=r"pooled context \[b, D1, D2, D3, 2\] expected"):
            _init(models.GateConv("C", impl=impl), _struct((2, 8, 8, 2)))
        assert _init(models.GateConv("T", impl=impl), _struct((2, 2, 8, 8, 2)))


def test_temporal_shift_rejects_maps_that_are_not_clips():
    # A TSM frame map [B*T, H, W, C] used to be shifted along H without a word.
    with pytest.raises(ValueError, match=r"\[b, t, h, w, c\] expected, got \(8, 8, 8, 16\)"):
        models.temporal_shift(jnp.zeros((8, 8, 8, 16)))
    with pytest.raises(ValueError, match="fold_div"):
        models.temporal_shift(jnp.zeros((1, 2, 1, 1, 16)), fold_div=0)


def test_integer_clips_are_rejected():
    # Raw uint8 frames were cast and classified as if normalised.
    net = models.VideoNet(num_classes=3, form="C2D", num_segments=2, depth=14, width=8)
    with pytest.raises(ValueError, match="floating-point.*normalised.*uint8"):
        _init(net, _struct((1, 2, 32, 32, 3), jnp.uint8), train=False)
    backbone = models.ResNet(depth=14, width=8, form="C2D")
    with pytest.raises(ValueError, match="floating-point.*uint8"):
        _init(backbone, _struct((2, 32, 32, 3), jnp.uint8), train=False)


def test_videonet_checks_dropout():
    net = models.VideoNet(num_classes=3, form="C2D", num_segments=2, depth=14, width=8, dropout=1.5)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        _init(net, _struct((1, 2, 32, 32, 3)), train=False)


def test_placement_checks_impl_even_without_units():
    with pytest.raises(ValueError, match="unknown impl 'foo'"):
        _init(models.Attention("none", impl="foo"), _struct((1, 2, 4, 4, 8)), train=False)


@pytest.mark.parametrize("form", ["TSM", "I3D"])
def test_forward_mode_through_the_whole_network_with_xla_attention(form):
    # README: forward mode (jax.jvp, jacfwd, hessian) needs attention_impl='xla'; the backbone's
    # own 1×1 convolutions and max-pool used to be reverse-mode only (custom_vjp).
    net = models.create(
        f"{form}_CinST", num_classes=3, num_segments=2, depth=14, width=8, attention_impl="xla"
    )
    clips = jax.random.normal(KEY, (1, 2, 32, 32, 3))
    # Jitted: op by op, the network's hundreds of small ops take a minute to dispatch.
    variables = jax.jit(lambda k: net.init(k, clips, train=False))(KEY)
    f = lambda x: net.apply(variables, x, train=False)  # noqa: E731
    tangent = jax.random.normal(jax.random.key(1), clips.shape)
    y, dy = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(clips, tangent)
    # Reverse mode gives the same directional derivative: <grad(c·y), t> = c·dy.
    cot = jnp.arange(3.0)[None]
    g = jax.jit(lambda x: jax.vjp(f, x)[1](cot)[0])(clips)
    np.testing.assert_allclose(
        float(jnp.vdot(g, tangent)), float(jnp.vdot(cot, dy)), rtol=1e-4, atol=1e-6
    )


def test_public_names_are_documented():
    for name in models.__all__:
        obj = getattr(models, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        assert (obj.__doc__ or "").strip(), name
        if inspect.isclass(obj):
            for member, value in vars(obj).items():
                if member.startswith("_") or not isinstance(value, property):
                    continue
                assert (value.__doc__ or "").strip(), f"{name}.{member}"


def test_xla_gate_conv_of_a_bf16_network_computes_in_float32():
    # README: the gates' 3×3×3 convolutions compute in float32 for bf16 maps; 'xla' used to
    # round the pooled context and the kernel to bf16 first.
    pooled = jax.random.normal(KEY, (2, 3, 5, 4, 2)) * 3
    conv = models.GateConv("T", dtype=jnp.bfloat16, impl="xla")
    variables = conv.init(KEY, pooled)
    got = conv.apply(variables, pooled)
    want = models.GateConv("T", impl="xla").apply(variables, pooled).astype(jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_an_empty_batch_gives_empty_logits():
    # The frames were regrouped into clips with a -1 reshape, which fails on zero frames.
    net = models.create("TSM_CinST", num_classes=3, num_segments=2, depth=14, width=8)
    variables = jax.jit(lambda k: net.init(k, jnp.zeros((1, 2, 32, 32, 3)), train=False))(KEY)
    logits = jax.jit(lambda v, x: net.apply(v, x, train=False))(
        variables, jnp.zeros((0, 2, 32, 32, 3))
    )
    assert logits.shape == (0, 3) and logits.dtype == jnp.float32


def test_classifier_in_the_backbone_is_initialised_as_new_fc():
    """dropout=0 puts the classifier at base_model/fc; the release's TSN initialises it as it
    does new_fc, normal(0, 0.001) with zero bias."""
    shapes = {}
    for dropout in (0.0, 0.5):
        net = models.create(
            "TSM", num_classes=64, num_segments=2, depth=14, width=8, dropout=dropout
        )
        params = net.init(jax.random.key(0), jnp.zeros((1, 2, 32, 32, 3)), train=False)["params"]
        head = params["base_model"]["fc"] if dropout == 0 else params["new_fc"]
        shapes[dropout] = head["kernel"].shape
        assert 0.0007 < float(jnp.std(head["kernel"])) < 0.0013, dropout
        assert not jnp.any(head["bias"])
    assert shapes[0.0] == shapes[0.5]


@pytest.mark.parametrize("train", [False, True], ids=["inference", "train"])
def test_gradients_on_an_empty_batch_match_xla(train):
    # The fused gate convolution probed the map's first element (IndexError on 0 clips), and
    # its batch norm's gradient divided by the Python int n = 0 (ZeroDivisionError); 'xla' gave
    # gradients. The loss does not depend on the parameters: their gradients are 0 ('xla' makes
    # its gate BatchNorms' scale gradients NaN in training, 0·(1/√var) with var of no values).
    x = jnp.zeros((0, 2, 4, 4, 8))
    grads = {}
    for impl in models.IMPLS:
        unit = models.AttentionUnit("CinST", impl=impl)
        init = jax.jit(lambda k, u=unit: u.init(k, jnp.ones((1, 2, 4, 4, 8)), train=False))
        variables = init(KEY)

        def loss(params, x, unit=unit, variables=variables):
            y, _ = unit.apply(
                {**variables, "params": params}, x, train=train, mutable=["batch_stats"]
            )
            return jnp.sum(y)

        grads[impl] = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)
    (params, dx), (want_params, want_dx) = grads["fused"], grads["xla"]
    assert dx.shape == want_dx.shape == x.shape
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params), strict=True):
        assert not np.any(got), got
        np.testing.assert_array_equal(got, np.where(np.isnan(want), 0, want))


@pytest.mark.parametrize("name", ["TSM_BN", "C2D_BN", "I3D_BN"])
def test_a_bn_suffix_without_placement_is_rejected(name):
    # `_BN` belongs to a placement in the release's names (TSM_CinST_BN); TSM_BN used to build
    # a plain TSM without a word, hiding a placement lost from the name.
    with pytest.raises(ValueError, match=f"unknown model name '{name}'; valid names: C2D, ") as e:
        models.create(name, num_classes=3)
    assert "\n" not in str(e.value)
    # The release's names, with or without `_BN` after a placement, still parse.
    form = name[:3]
    assert models.parse_name(form) == models.ModelName(form, "none")
    assert models.parse_name(f"{form}_CinST") == models.parse_name(f"{form}_CinST_BN")
    for valid in models.valid_names():
        assert models.parse_name(valid).canonical == valid


def test_i3d_takes_clips_of_any_length():
    # The 3D form's convolutions and pooling take any T (num_segments is its data's clip
    # length), but VideoNet refused every T but num_segments; the 2D forms still need it.
    i3d = models.create("I3D_CinST", num_classes=3, num_segments=4, depth=14, width=8)
    clips = jax.random.normal(KEY, (1, 2, 16, 16, 3))
    shapes = _init(i3d, _struct((1, 4, 16, 16, 3)), train=False)  # as built for its 4 frames
    variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes)
    logits = jax.jit(lambda v, x: i3d.apply(v, x, train=False))(variables, clips)
    assert logits.shape == (1, 3) and np.all(np.isfinite(logits))
    with pytest.raises(ValueError, match=r"clips \[B, T, H, W, 3\], T >= 1, got shape"):
        _init(i3d, _struct((1, 0, 16, 16, 3)), train=False)
    tsm = models.create("TSM_CinST", num_classes=3, num_segments=4, depth=14, width=8)
    with pytest.raises(ValueError, match=r"\[B, 4, H, W, 3\] \(T = num_segments for TSM\)"):
        _init(tsm, _struct((1, 2, 16, 16, 3)), train=False)


def test_create_rejects_a_clip_length_below_one():
    # num_segments=0 built a network that failed as a modulo by zero when applied.
    for n in (0, -2):
        with pytest.raises(ValueError, match=f"num_segments must be a positive integer, got {n}"):
            models.create("TSM", num_classes=3, num_segments=n)


@pytest.mark.parametrize("impl", models.IMPLS)
def test_a_training_step_on_an_empty_batch_keeps_the_running_statistics(impl):
    # The batch statistics of no values are NaN (0 / 0): every running mean and variance, the
    # backbone's and the gates', became NaN after one such step. PyTorch leaves them unchanged.
    net = models.create(
        "TSM_CinST", num_classes=3, num_segments=2, depth=14, width=8, attention_impl=impl
    )
    variables = jax.jit(lambda k: net.init(k, jnp.zeros((1, 2, 32, 32, 3)), train=False))(KEY)
    step = jax.jit(
        lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": KEY})
    )
    logits, updates = step(variables, jnp.zeros((0, 2, 32, 32, 3)))
    assert logits.shape == (0, 3)
    for got, want in zip(
        jax.tree.leaves(updates["batch_stats"]),
        jax.tree.leaves(variables["batch_stats"]),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)


def _training_step(net, variables, clips):
    """`value_and_grad` of a training step's loss, with the updated running statistics."""

    def loss(params, stats):
        y, updates = net.apply(
            {"params": params, "batch_stats": stats},
            clips,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": KEY},
        )
        return jnp.sum(y**2), updates["batch_stats"]

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return step.lower(variables["params"], variables["batch_stats"])


def test_remat_recomputes_every_block_and_keeps_less():
    # create(remat=True) reaches the backbone: the training step's program holds a second copy
    # of the blocks' convolutions and, compiled, needs far less temporary memory (59 % here;
    # `nn.remat`, whose recomputation XLA:CPU merged back into the forward pass: 95 %).
    def program(remat):
        net = models.create("C2D", num_classes=3, num_segments=4, depth=14, width=16, remat=remat)
        clips = jnp.ones((2, 4, 32, 32, 3))
        return _training_step(net, _init(net, clips, train=False), clips)

    plain, remat = program(False), program(True)
    convs = [p.as_text().count("stablehlo.convolution") for p in (plain, remat)]
    assert convs[1] > convs[0], convs
    temps = [p.compile().memory_analysis().temp_size_in_bytes for p in (plain, remat)]
    assert temps[1] < 0.8 * temps[0], temps


def test_remat_computes_the_same_training_step():
    # The same function recomputed: the same loss, gradients and running statistics, with the
    # fused attention's hand-written gradients under the recomputation (one block with shift
    # and CinST gates, so that it compiles in seconds).
    class OneBlock(models.ResNet):
        @property
        def stage_sizes(self):
            return (1,)

    frames = jax.random.normal(KEY, (4, 16, 16, 3))
    plain, remat = (
        OneBlock(form="TSM", attention="CinST", num_segments=2, width=4, remat=r)
        for r in (False, True)
    )
    variables = jax.jit(lambda k: plain.init(k, frames, train=False))(KEY)
    lowered = [_training_step(net, variables, frames) for net in (plain, remat)]
    counts = [low.as_text().count("stablehlo.convolution") for low in lowered]
    assert counts[1] > counts[0], counts
    args = variables["params"], variables["batch_stats"]
    compiled = [low.compile() for low in lowered]
    # Compiled, the recomputation is still there (not merged back into the forward pass).
    kept = [len(re.findall(r" convolution\(", c.as_text())) for c in compiled]
    assert kept[1] > kept[0], kept
    (want, want_stats), want_grads = compiled[0](*args)
    (got, got_stats), got_grads = compiled[1](*args)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert jax.tree.structure(got_grads) == jax.tree.structure(want_grads)
    for a, b in zip(
        jax.tree.leaves((want_stats, want_grads)), jax.tree.leaves((got_stats, got_grads))
    ):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_create_checks_remat():
    with pytest.raises(ValueError, match="remat must be True or False, got 'false'"):
        models.create("TSM", num_classes=3, remat="false")


def _explicit_mesh():
    from jax.sharding import AxisType

    return jax.make_mesh((8,), ("data",), (AxisType.Explicit,))


def _on_mesh(mesh, tree, spec):
    from jax.sharding import NamedSharding

    return jax.device_put(tree, NamedSharding(mesh, spec))


def test_dropout_under_explicit_sharding_is_flax_dropout():
    # `jax.make_mesh` makes Explicit axes by default, and under them nn.Dropout's unsharded mask
    # was refused for a batch-sharded input: a network could not be trained so. The same mask
    # as nn.Dropout's from the same key, on one device and sharded.
    from jax.sharding import PartitionSpec as P

    from aia_jax.models.layers import Dropout

    x = jax.random.normal(KEY, (8, 6))
    rngs = {"dropout": jax.random.key(3)}
    nn_dropout = jax.jit(
        lambda x: flax_nn.Dropout(0.5).apply({}, x, deterministic=False, rngs=rngs)
    )(x)
    ours = jax.jit(lambda x: Dropout(0.5).apply({}, x, deterministic=False, rngs=rngs))
    np.testing.assert_array_equal(ours(x), nn_dropout)
    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        got = ours(_on_mesh(mesh, x, P("data")))
    np.testing.assert_array_equal(got, nn_dropout)
    assert got.sharding.spec[0] == "data"


def test_fused_gate_conv_under_explicit_sharding():
    # The fused gate convolution indexed one element of the (batch-sharded) pooled map and
    # joined unsharded zero slabs to it: both refused under Explicit axes. Same value and
    # gradients as on one device.
    from jax.sharding import PartitionSpec as P

    from aia_jax.models import fused

    p_max, p_mean = jax.random.normal(KEY, (2, 8, 5, 6, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 2, 1))

    def loss(p_max, p_mean, kernel):
        return jnp.sum(fused.gate_conv(p_max, p_mean, kernel) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    want = step(p_max, p_mean, kernel)
    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        maps = _on_mesh(mesh, (p_max, p_mean), P("data"))
        got = step(*maps, _on_mesh(mesh, kernel, P()))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_stacked_gate_convs_under_explicit_sharding():
    # Two gates of one pooled shape run stacked on a new leading axis, the (sharded) batch on
    # the next; their output is materialized along D1: `materialize`'s padding of the batch axis
    # is refused under Explicit axes. Same values and gradients.
    from jax.sharding import PartitionSpec as P

    from aia_jax.models import fused

    maps = jax.random.normal(KEY, (4, 8, 5, 6, 4))
    kernels = jax.random.normal(jax.random.key(1), (2, 3, 3, 3, 2, 1))

    def loss(maps, kernels):
        a, b = fused.gate_convs([maps[0], maps[1]], [maps[2], maps[3]], [kernels[0], kernels[1]])
        return jnp.sum(a**2) + jnp.sum(jnp.sin(b))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    want = step(maps, kernels)
    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        got = step(_on_mesh(mesh, maps, P(None, "data")), _on_mesh(mesh, kernels, P()))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_pools_without_anchor_under_explicit_sharding():
    # Without an anchor the public pools copied the map through one element of it, which
    # explicit sharding refuses to index on a batch-sharded map. Same values and gradients.
    from jax.sharding import PartitionSpec as P

    from aia_jax.models import fused

    x = jax.random.normal(KEY, (8, 4, 3, 5, 6))

    def loss(x):
        pairs = fused.pool(x, (1, 3)) + ((models.pool_max_mean(x, 2),),)
        return sum(jnp.sum(jnp.sin(p)) for p in jax.tree.leaves(pairs))

    step = jax.jit(jax.value_and_grad(loss))
    want = step(x)
    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        got = step(_on_mesh(mesh, x, P("data")))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-7)
    assert got[1].sharding.spec[0] == "data"
