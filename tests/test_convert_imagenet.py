"""ImageNet initialisation from torchvision-layout ResNet state dicts (`convert.imagenet`).

The weights come from `torch_reference.TorchvisionResNet` (torchvision's keys and layout) with
random values. A C2D backbone must compute torchvision's per-frame features; the mean-inflated
I3D must compute them too on a clip of identical frames, on the frames its temporal receptive
field keeps away from the zero padding at the clip ends.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402

from aia_jax import models  # noqa: E402
from aia_jax.convert import ConversionError, imagenet, release  # noqa: E402
from tests import torch_reference  # noqa: E402


def _torchvision(depth: int, width: int, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    net = torch_reference.TorchvisionResNet(depth, width=width).eval()
    torch_reference.randomize_(net, seed)
    return net, {k: v.numpy() for k, v in net.state_dict().items()}


def _zeros(model) -> dict:
    return jax.tree_util.tree_map(
        lambda s: np.zeros(s.shape, s.dtype), release.variable_shapes(model)
    )


def _rel_err(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


@pytest.fixture(scope="module")
def resnet50_w8():
    return _torchvision(50, 8, seed=1)


def test_c2d_features_equal_torchvision(resnet50_w8):
    net, state = resnet50_w8
    model = models.create("C2D", num_classes=5, num_segments=4, depth=50, width=8)
    # Zeros for what ImageNet does not fill: only the backbone is compared (and no init compile).
    variables = imagenet.from_torchvision(state, model, init=_zeros(model))
    images = _images(8)
    clips = np.transpose(images, (0, 2, 3, 1)).reshape(2, 4, 64, 64, 3)

    def features(v, x):
        _, state = model.apply(
            v,
            x,
            train=False,
            capture_intermediates=lambda m, method: isinstance(m, models.ResNet),
        )
        return state["intermediates"]["base_model"]["__call__"][0]

    got = np.asarray(jax.jit(features)(variables, clips))
    with torch.no_grad():
        want = net.features(torch.from_numpy(images)).numpy()
    assert got.shape == want.shape == (8, 256)
    assert _rel_err(got, want) < 1e-5


def test_inflated_i3d_equals_2d_away_from_the_clip_ends(resnet50_w8):
    net, state = resnet50_w8
    probe = models.create("I3D", num_classes=5, depth=50, width=8)
    radius = imagenet.temporal_radius(probe)
    assert radius == 11  # stem ±2, nine inflated 3×1×1 convs ±1 each
    frames = 2 * radius + 2  # frames radius and radius + 1 see no padding
    model = models.create("I3D", num_classes=5, num_segments=frames, depth=50, width=8)
    variables = imagenet.from_torchvision(state, model, init=_zeros(model))
    stem = variables["params"]["base_model"]["conv1"]["kernel"]
    assert stem.shape == (5, 7, 7, 3, 8)
    np.testing.assert_allclose(
        stem.sum(axis=0), np.transpose(state["conv1.weight"], (2, 3, 1, 0)), rtol=1e-6
    )
    assert variables["params"]["base_model"]["layer1_0"]["conv1"]["kernel"].shape[0] == 3

    images = _images(2, seed=2)
    clips = np.repeat(np.transpose(images, (0, 2, 3, 1))[:, None], frames, axis=1)

    def last_block(v, x):
        _, state = model.apply(
            v,
            x,
            train=False,
            capture_intermediates=lambda m, method: m.name == "layer4_2",
        )
        return state["intermediates"]["base_model"]["layer4_2"]["__call__"][0].mean(axis=(2, 3))

    per_frame = np.asarray(jax.jit(last_block)(variables, clips))  # [2, frames, 256]
    with torch.no_grad():
        want = net.features(torch.from_numpy(images)).numpy()
    for t in (radius, frames - 1 - radius):
        assert _rel_err(per_frame[:, t], want) < 1e-5, t
    # The ends honestly differ: the padding's share of the output decays with the distance
    # from the end, vanishing into float32 rounding well inside the radius; only frames at
    # least `radius` from both ends are exact by construction.
    for t in (0, frames - 1):
        assert _rel_err(per_frame[:, t], want) > 1e-2, t


def test_imagenet_classifier_is_kept_when_the_network_has_it():
    net, state = _torchvision(14, 8, seed=3)
    model = models.create("C2D", num_classes=1000, num_segments=4, depth=14, width=8, dropout=0.0)
    assert imagenet.keeps_fc(state, model)
    variables = imagenet.from_torchvision(state, model)
    images = _images(8, seed=4)
    clips = np.transpose(images, (0, 2, 3, 1)).reshape(2, 4, 64, 64, 3)
    got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, clips))
    with torch.no_grad():
        want = net(torch.from_numpy(images)).numpy().reshape(2, 4, 1000).mean(axis=1)
    assert _rel_err(got, want) < 1e-5

    fresh = imagenet.from_torchvision(state, model, keep_fc=False, init=_zeros(model))
    assert not fresh["params"]["base_model"]["fc"]["kernel"].any()
    other = models.create("C2D", num_classes=1000, num_segments=4, depth=14, width=8)
    assert not imagenet.keeps_fc(state, other)  # dropout 0.5: the classifier is new_fc


@pytest.mark.slow
@pytest.mark.parametrize("name", ["TSM_CinST_BN", "I3D_STinC2CinST_BN"])
def test_full_width_resnet50_accounting(name):
    net = torch_reference.TorchvisionResNet(50)  # full width, torchvision's own init
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    model = models.create(name, num_classes=174)
    zeros = _zeros(model)
    variables = imagenet.from_torchvision(state, model, init=zeros)
    filled = 0
    for collection, tree in release.variable_shapes(model).items():
        for path, _ in release._leaves(tree):
            value = variables[collection]
            for part in path:
                value = value[part]
            if path[0] != "base_model" or any(p.startswith("eft") for p in path):
                assert not value.any(), path  # attention and classifier: left as initialised
                continue
            source = release.to_flax_layout(state[release.torch_key(collection, path[1:])])
            if value.ndim == source.ndim + 1:  # inflated I3D kernel
                source = np.repeat(source[None], value.shape[0], axis=0) / value.shape[0]
            np.testing.assert_array_equal(value, source, err_msg=str(path))
            filled += 1
    counters = sum(k.endswith("num_batches_tracked") for k in state)
    assert filled == len(state) - counters - 2  # every tensor but fc.weight, fc.bias


# ---------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def tiny_state():
    return _torchvision(14, 8)[1]


def _error(state, model) -> str:
    with pytest.raises(ConversionError) as info:
        imagenet.from_torchvision(state, model, init=_zeros(model))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_wrong_depth_is_named():
    _, state = _torchvision(101, 8)
    message = _error(state, models.create("C2D", num_classes=5, depth=50, width=8))
    assert message.startswith("ImageNet weights do not fit the backbone of C2D ResNet-50")
    assert "depth: weights are ResNet-101, network is 50" in message
    assert "unexpected: layer3.10.bn1.bias" in message


def test_wrong_width_is_named():
    _, state = _torchvision(14, 16)
    message = _error(state, models.create("TSM", num_classes=5, depth=14, width=8))
    assert "width: weights have stem width 16, network 8" in message
    assert "wrong shape: bn1.running_mean (8,) expected, (16,) found" in message


def test_one_error_lists_missing_unexpected_and_wrong_shape(tiny_state):
    state = dict(tiny_state)
    del state["layer2.0.bn1.running_var"]
    state["layer2.0.extra.weight"] = np.zeros(3, np.float32)
    state["layer4.0.conv2.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    message = _error(state, models.create("I3D_CinST_BN", num_classes=5, depth=14, width=8))
    assert "missing: layer2.0.bn1.running_var" in message
    assert "unexpected: layer2.0.extra.weight" in message
    assert "wrong shape: layer4.0.conv2.weight (64, 64, 3, 3) expected, (64, 64, 1, 1)" in message


def test_release_checkpoints_and_basic_blocks_are_refused(tiny_state):
    model = models.create("C2D", num_classes=5, depth=14, width=8)
    release_state = {"module.base_model." + k: v for k, v in tiny_state.items()}
    with pytest.raises(ConversionError, match="not torchvision ImageNet weights"):
        imagenet.from_torchvision(release_state, model)
    basic = {k: v for k, v in tiny_state.items() if ".conv3." not in k and ".bn3." not in k}
    assert "basic-block ResNet (resnet18/34)" in _error(basic, model)


def test_attention_and_head_keep_their_initialisers(tiny_state):
    model = models.create("TSM_CinST_BN", num_classes=5, num_segments=4, depth=14, width=8)
    init = imagenet.initial_variables(model, seed=3)
    variables = imagenet.from_torchvision(tiny_state, model, init=init)
    np.testing.assert_array_equal(
        variables["params"]["new_fc"]["kernel"], init["params"]["new_fc"]["kernel"]
    )
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        variables["params"]["base_model"]["layer2_0"]["eft"],
        init["params"]["base_model"]["layer2_0"]["eft"],
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["base_model"]["layer3_0"]["bn2"]["var"],
        tiny_state["layer3.0.bn2.running_var"],
    )
