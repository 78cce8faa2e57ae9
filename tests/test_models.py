"""Unit tests of the model zoo: shift, gates, block rule, names, counts, jit in f32 and bf16."""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aia_jax import models
from aia_jax.convert import release
from aia_jax.models.attention import GateConv, _apply_gate, _norm

KEY_LISTS = sorted((Path(__file__).parent / "data" / "official_keys").glob("*.txt"))


def test_temporal_shift_hand_computed():
    # One clip of 3 frames, 1×1 pixels, 16 channels → fold 2; frame f, channel c holds 100f + c.
    x = (100 * np.arange(3)[:, None] + np.arange(16)[None, :]).astype(np.float32)
    x = x.reshape(1, 3, 1, 1, 16)
    y = np.asarray(models.temporal_shift(jnp.asarray(x)))[0, :, 0, 0]
    assert y.shape == (3, 16)
    np.testing.assert_array_equal(y[:, 0:2], [[100, 101], [200, 201], [0, 0]])  # from t+1
    np.testing.assert_array_equal(y[:, 2:4], [[0, 0], [2, 3], [102, 103]])  # from t-1
    np.testing.assert_array_equal(y[:, 4:], x[0, :, 0, 0, 4:])  # untouched


def test_temporal_shift_keeps_clips_apart():
    x = jnp.ones((2, 4, 2, 2, 8))
    y = np.asarray(models.temporal_shift(x))
    assert y.shape == x.shape
    # Zero padding at both ends of every clip: channel 0 is empty in the last frame, channel 1
    # in the first, and no value leaks from clip 0 into clip 1.
    assert (y[:, -1, ..., 0] == 0).all() and (y[:, :-1, ..., 0] == 1).all()
    assert (y[:, 0, ..., 1] == 0).all() and (y[:, 1:, ..., 1] == 1).all()


def _release_shift(x: np.ndarray, fold_div: int = 8) -> np.ndarray:
    """The release's shift as it writes it: zeros, then three slice assignments."""
    fold = x.shape[-1] // fold_div
    out = np.zeros_like(x)
    out[:, :-1, ..., :fold] = x[:, 1:, ..., :fold]
    out[:, 1:, ..., fold : 2 * fold] = x[:, :-1, ..., fold : 2 * fold]
    out[..., 2 * fold :] = x[..., 2 * fold :]
    return out


# 64 and 20 channels split into whole folds (shifted as [groups, fold]); 100 (fold 12) does
# not (shifted along the channel axis); 7 has no fold at all (the map passes unchanged).
@pytest.mark.parametrize("channels", [64, 20, 100, 7])
def test_temporal_shift_any_channel_count(channels):
    rng = np.random.default_rng(channels)
    x = rng.normal(size=(2, 5, 3, 2, channels)).astype(np.float32)
    cotangent = rng.normal(size=x.shape).astype(np.float32)
    y, vjp = jax.vjp(jax.jit(models.temporal_shift), jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), _release_shift(x))
    # The shift moves values without arithmetic, so its gradient is the opposite move: channels
    # that came from frame t+1 send their gradient back to t+1.
    (dx,) = vjp(jnp.asarray(cotangent))
    fold = channels // 8
    expected = np.array(cotangent)
    expected[:, :, ..., : 2 * fold] = 0
    expected[:, 1:, ..., :fold] = cotangent[:, :-1, ..., :fold]
    expected[:, :-1, ..., fold : 2 * fold] = cotangent[:, 1:, ..., fold : 2 * fold]
    np.testing.assert_array_equal(np.asarray(dx), expected)
    # Forward mode too (jax.jvp, jax.hessian, jax.linearize): the shift is linear, so its
    # tangent is the shifted tangent.
    _, tangent = jax.jvp(models.temporal_shift, (jnp.asarray(x),), (jnp.asarray(cotangent),))
    np.testing.assert_array_equal(np.asarray(tangent), _release_shift(cotangent))


def test_pool_is_max_then_mean():
    x = jnp.asarray([[1.0, 5.0, 3.0]])
    np.testing.assert_allclose(models.pool_max_mean(x, 1), [[5.0, 3.0]])


# --- an independent numpy version of one gate, in the release's own layout -----------------

_RELEASE_POOL_AXIS = {"C": 2, "T": 1, "H": 3, "W": 4}  # of x as [b, t, c, h, w]
# Conv3d input [b, 2, D1, D2, D3] as a permutation of the pooled [b, 2, t, c, h, w] minus one axis.
_RELEASE_CONV_DIMS = {"C": "thw", "T": "chw", "H": "tcw", "W": "thc"}


def _conv3d_same(inp: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Cross-correlation of [b, 2, D1, D2, D3] with torch weight [1, 2, 3, 3, 3], padding 1."""
    padded = np.pad(inp, [(0, 0), (0, 0), (1, 1), (1, 1), (1, 1)])
    d1, d2, d3 = inp.shape[2:]
    out = np.zeros((inp.shape[0], 1, d1, d2, d3))
    for i in range(3):
        for j in range(3):
            for k in range(3):
                window = padded[:, :, i : i + d1, j : j + d2, k : k + d3]
                out[:, 0] += np.einsum("bcxyz,c->bxyz", window, weight[0, :, i, j, k])
    return out


def _numpy_gate(x_btchw: np.ndarray, gate: str, weight: np.ndarray, bn: dict) -> np.ndarray:
    axis = _RELEASE_POOL_AXIS[gate]
    pooled = np.stack([x_btchw.max(axis), x_btchw.mean(axis)], axis=1)  # [b, 2, rest…]
    rest = [d for d in "tchw" if d != "tchw"[axis - 1]]
    order = [rest.index(d) + 2 for d in _RELEASE_CONV_DIMS[gate]]
    conv = _conv3d_same(np.transpose(pooled, [0, 1, *order]), weight)
    normed = (conv - bn["mean"]) / np.sqrt(bn["var"] + 1e-5) * bn["scale"] + bn["bias"]
    g = 1 / (1 + np.exp(-normed))[:, 0]  # [b, D1, D2, D3]
    # Back to [b, t, c, h, w] with the pooled axis as a singleton.
    g = np.transpose(g, [0, *np.argsort(order) + 1])
    return np.expand_dims(g, axis)


class _OneGate(nn.Module):
    gate: str

    @nn.compact
    def __call__(self, x):
        return _apply_gate(
            x, self.gate, GateConv(self.gate), _norm(jnp.float32, jnp.float32, False, "bn"), x.dtype
        )


@pytest.mark.parametrize("gate", ["C", "T", "H", "W"])
def test_gate_matches_hand_computed_release_layout(gate):
    rng = np.random.default_rng(0)
    b, t, c, h, w = 2, 3, 5, 4, 6  # all different so any axis mix-up shows
    x_btchw = rng.normal(size=(b, t, c, h, w)).astype(np.float32)
    weight = rng.normal(size=(1, 2, 3, 3, 3)).astype(np.float32)
    bn = {"scale": 1.3, "bias": -0.2, "mean": 0.1, "var": 0.7}
    module = _OneGate(gate)
    x = jnp.asarray(np.transpose(x_btchw, (0, 1, 3, 4, 2)))  # → [b, t, h, w, c]
    variables = {
        "params": {
            "GateConv_0": {"kernel": jnp.asarray(release.to_flax_layout(weight))},
            "bn": {"scale": jnp.full((1,), bn["scale"]), "bias": jnp.full((1,), bn["bias"])},
        },
        "batch_stats": {
            "bn": {"mean": jnp.full((1,), bn["mean"]), "var": jnp.full((1,), bn["var"])}
        },
    }
    got = np.asarray(module.apply(variables, x))
    want = np.transpose(_numpy_gate(x_btchw, gate, weight, bn), (0, 1, 3, 4, 2))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_units_apply_second_gate_to_the_original_input():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 3, 4, 4, 8)).astype(np.float32))
    for unit in ("CinST", "STinC"):
        module = models.AttentionUnit(unit)
        variables = module.init(jax.random.key(0), x, train=False)
        y = module.apply(variables, x, train=False)
        # x * gate with gate in (0, 1): the sign of x survives and |y| < |x|.
        assert np.all(np.sign(y) == np.sign(x)) and np.all(np.abs(y) < np.abs(x))
        assert set(variables["params"]) == {
            "C_conv",
            "C_bn",
            "T_conv",
            "T_bn",
            "H_conv",
            "H_bn",
            "W_conv",
            "W_bn",
        }


def test_block_rule():
    assert [models.carries_attention(i, 6) for i in range(6)] == [True] * 6
    assert [models.carries_attention(i, 23) for i in range(4)] == [True, False, True, False]


@pytest.mark.parametrize("path", KEY_LISTS, ids=lambda p: p.stem)
def test_release_keys_shapes_and_dtypes(path):
    """`to_torch` of a network built from each official key list yields exactly that list."""
    lines = path.read_text().splitlines()
    header = dict(kv.split("=") for kv in lines[1].lstrip("# ").split())
    want = {}
    for line in lines:
        if line and not line.startswith("#"):
            key, shape, dtype = line.split()
            want[key] = (() if shape == "scalar" else tuple(map(int, shape.split("x"))), dtype)
    model = models.create(
        header["net"],
        num_classes=int(header["num_class"]),
        num_segments=int(header["num_segments"]),
        depth=int(header["arch"].removeprefix("resnet")),
        dropout=float(header["dropout"]),
    )
    shapes = release.variable_shapes(model)
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    got = {k: (v.shape, str(v.dtype)) for k, v in release.to_torch(zeros, model).items()}
    assert got == want


def _count(tree) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize(
    "name,expected",
    [
        ("TSM", 23_864_558),
        ("C2D", 23_864_558),
        ("TSM_CinST_BN", 23_868_142),
        ("C2D_STinC", 23_868_142),
        ("I3D", 27_580_398),
        ("I3D_CinST_BN", 27_583_982),
    ],
)
def test_parameter_counts(name, expected):
    shapes = release.variable_shapes(models.create(name, num_classes=174))
    assert _count(shapes["params"]) == expected


def test_resnet101_alternate_blocks_have_neither_attention_nor_shift():
    shapes = release.variable_shapes(models.create("TSM_CinST_BN", num_classes=174, depth=101))
    base = shapes["params"]["base_model"]
    assert (
        "eft" in base["layer3_0"] and "eft" not in base["layer3_1"] and "eft" in base["layer3_22"]
    )


def test_wrongly_shaped_inputs_are_named():
    unit = models.AttentionUnit("CinST")
    with pytest.raises(
        ValueError, match=r"\[b, t, h, w, c\] expected, got float32 \(16, 8, 8, 4\)"
    ):
        unit.init(jax.random.key(0), jnp.zeros((16, 8, 8, 4)), train=False)
    with pytest.raises(ValueError, match="floating-point map"):
        unit.init(jax.random.key(0), jnp.zeros((2, 8, 8, 8, 4), jnp.int32), train=False)
    tsm = models.ResNet(depth=14, width=8, form="TSM", num_segments=8)
    with pytest.raises(ValueError, match="12 frames are not whole clips of num_segments=8"):
        tsm.init(jax.random.key(0), jnp.zeros((12, 32, 32, 3)), train=False)
    i3d = models.ResNet(depth=14, width=8, form="I3D")
    with pytest.raises(ValueError, match=r"clips \[B, T, H, W, C\] expected"):
        i3d.init(jax.random.key(0), jnp.zeros((8, 32, 32, 3)), train=False)
    # A plain C2D classifies frames independently: any number of them.
    c2d = models.ResNet(depth=14, width=8, form="C2D", num_segments=8)
    frames = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
    assert jax.eval_shape(lambda x: c2d.init(jax.random.key(0), x, train=False), frames)


def test_create_rejects_unknown_names_with_the_list():
    with pytest.raises(ValueError, match="valid names: C2D, C2D_C_BN"):
        models.create("TSM_CinSt", num_classes=3)
    assert models.parse_name("TSM_CinST") == models.parse_name("TSM_CinST_BN")
    assert models.parse_name("C2D").placement == "none"


# float32 C2D and TSM are compared with the PyTorch reference, gradients included, in
# test_parity.py; the release has no I3D and no bf16. bf16 TSM runs through the trainer's step
# in test_train_step.py (C2D is TSM without the shift: a bf16 C2D here compiled for 30-50 s and
# checked nothing those two do not).
@pytest.mark.parametrize(
    "form,dtype", [("I3D", jnp.float32), ("I3D", jnp.bfloat16)], ids=["f32-I3D", "bf16-I3D"]
)
def test_jit_forward_and_gradient_step(form, dtype):
    model = models.create(
        f"{form}_CinST", num_classes=5, num_segments=4, depth=14, width=8, dtype=dtype
    )
    clips = jax.random.normal(jax.random.key(0), (2, 4, 32, 32, 3))
    variables = jax.jit(lambda k: model.init(k, clips, train=False))(jax.random.key(1))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, clips)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32

    @jax.jit
    def step(variables, clips):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                clips,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(2)},
            )
            return jnp.mean(logits**2), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, variables["params"], grads)
        return {"params": params, "batch_stats": updates["batch_stats"]}, loss, grads

    new, loss, grads = step(variables, clips)
    assert np.isfinite(loss)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    gate_grad = grads["base_model"]["layer1_0"]["eft"]["T_conv"]["kernel"]
    assert float(jnp.abs(gate_grad).sum()) > 0
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(new))


def test_float64_network_returns_float64_logits():
    # A float64 network (x64) is float64 end to end, its pooled features and logits included.
    with jax.enable_x64(True):
        model = models.create(
            "C2D",
            num_classes=3,
            num_segments=1,
            depth=14,
            width=4,
            dtype=jnp.float64,
            param_dtype=jnp.float64,
        )
        clips = jax.random.normal(jax.random.key(0), (1, 1, 16, 16, 3), jnp.float64)
        # Shapes and dtypes only (nothing compiled): the dtype is what is checked.
        variables = jax.eval_shape(lambda: model.init(jax.random.key(1), clips, train=False))
        logits = jax.eval_shape(lambda v: model.apply(v, clips, train=False), variables)
        assert logits.dtype == jnp.float64


def test_partial_bn_keeps_block_statistics_and_updates_the_stem():
    model = models.create("TSM_CinST", num_classes=3, num_segments=2, depth=14, width=8)
    frozen = models.create(
        "TSM_CinST", num_classes=3, num_segments=2, depth=14, width=8, partial_bn=True
    )
    clips = jax.random.normal(jax.random.key(0), (2, 2, 32, 32, 3))
    variables = jax.jit(lambda k: model.init(k, clips, train=False))(jax.random.key(1))
    _, updates = jax.jit(
        lambda v: frozen.apply(
            v, clips, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)}
        )
    )(variables)
    old, new = variables["batch_stats"]["base_model"], updates["batch_stats"]["base_model"]
    assert not np.allclose(old["bn1"]["mean"], new["bn1"]["mean"])
    np.testing.assert_array_equal(old["layer2_0"]["bn2"]["mean"], new["layer2_0"]["bn2"]["mean"])
    assert not np.allclose(
        old["layer2_0"]["eft"]["T_bn"]["mean"], new["layer2_0"]["eft"]["T_bn"]["mean"]
    )
    assert models.frozen_by_partial_bn(("base_model", "layer2_0", "bn2", "scale"))
    assert not models.frozen_by_partial_bn(("base_model", "bn1", "scale"))
    assert not models.frozen_by_partial_bn(("base_model", "layer2_0", "eft", "T_bn", "scale"))
