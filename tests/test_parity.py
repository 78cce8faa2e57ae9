"""The Flax networks equal the independent PyTorch implementation of the release.

Random inputs and random weights (every parameter and buffer), float32:
- eval mode (running statistics), logits of every placement on C2D and TSM;
- train mode (batch statistics): the logits, the running statistics they move and the
  gradient of a loss with respect to every parameter, for every placement inside one TSM
  bottleneck, and for whole networks of each kind (plain, one unit, two units in sequence
  and summed, on both 2D forms);
- ResNet-101's alternate-block rule and TSM's other shift placement.
Network weights go through `aia_jax.convert.from_torch`.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from aia_jax import models  # noqa: E402
from aia_jax.convert import release  # noqa: E402
from tests import torch_reference  # noqa: E402

PLACEMENTS = [p for p in models.PLACEMENTS if p != "none"]
NAMES = [f"{form}_{p}_BN" for form in ("C2D", "TSM") for p in PLACEMENTS] + ["C2D", "TSM"]
SEGMENTS, SIZE = 4, 64


def _rel_err(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _pair(
    name: str,
    *,
    depth: int = 14,
    width: int = 8,
    dropout: float = 0.5,
    seed: int = 0,
    shift_place: str = "blockres",
):
    ref = torch_reference.build(
        name,
        num_classes=7,
        num_segments=SEGMENTS,
        depth=depth,
        dropout=dropout,
        width=width,
        shift_place=shift_place,
    )
    torch_reference.randomize_(ref, seed)
    if depth > 50:
        # With every weight random, 33 residual blocks grow the activations a thousandfold and
        # float32 rounding with them; smaller residual branches keep the comparison meaningful.
        with torch.no_grad():
            for module_name, module in ref.named_modules():
                if module_name.endswith("bn3"):
                    module.weight.mul_(0.2)
    state = {"module." + k: v for k, v in ref.state_dict().items()}
    model = models.create(
        name,
        num_classes=7,
        num_segments=SEGMENTS,
        depth=depth,
        width=width,
        dropout=dropout,
        shift_place=shift_place,
    )
    return ref, model, release.from_torch(state, model)


def _clips(seed: int = 0):
    x = np.random.default_rng(seed).normal(size=(2, SEGMENTS, 3, SIZE, SIZE)).astype(np.float32)
    return x, jnp.asarray(np.transpose(x, (0, 1, 3, 4, 2)))


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_logits(name):
    ref, model, variables = _pair(name)
    x_torch, x_flax = _clips()
    with torch.no_grad():
        want = ref.eval()(torch.from_numpy(x_torch)).numpy()
    got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x_flax))
    assert _rel_err(got, want) < 1e-5


def _torch_grads(
    ref, x: np.ndarray, loss_fn, *, input_grad: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Output and parameter gradients of `loss_fn(ref(x))` in train mode, as float64 arrays;
    with `input_grad`, the gradient of `x` too, under the key 'input'."""
    ref.train().zero_grad()
    inp = torch.from_numpy(x).requires_grad_(input_grad)
    out = ref(inp)
    loss_fn(out).backward()
    grads = {k: p.grad.double().numpy() for k, p in ref.named_parameters()}
    if input_grad:
        grads["input"] = inp.grad.double().numpy()
    return out.detach().numpy(), grads


def _assert_gradients_match(got, want, exact):
    """Flax's float32 gradients are as close to the reference's float32 ones as those are to
    the reference in float64 (times two), or 1e-4 relative, tensor by tensor and overall.

    Through a dozen train-mode batch norms, random networks reach 1e-3 of float32 error in
    places, in both frameworks alike, and the gate BatchNorms' biases, whose gradients are
    sums that nearly cancel, more; a wrong gradient is off by far more than either.
    """
    assert set(want) <= set(got)
    scale = np.sqrt(sum(np.sum(v**2) for v in exact.values()))
    total_err, total_ref_err = 0.0, 0.0
    for key, value in want.items():
        err = np.linalg.norm(np.asarray(got[key], np.float64) - value)
        ref_err = np.linalg.norm(value - exact[key])
        assert err < 2 * ref_err + 1e-4 * np.linalg.norm(exact[key]) + 1e-6 * scale, key
        total_err, total_ref_err = total_err + err**2, total_ref_err + ref_err**2
    assert np.sqrt(total_err) < 2 * np.sqrt(total_ref_err) + 1e-5 * scale


def _block_variables(block, x, state):
    """The Flax variables of `block` filled from a torch bottleneck's state dict."""
    shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), x, train=False))
    variables = {}
    for collection, tree in shapes.items():
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = tuple(p.key for p in path)
            value = state[release.torch_key(collection, names)].numpy()
            node = variables.setdefault(collection, {})
            for n in names[:-1]:
                node = node.setdefault(n, {})
            node[names[-1]] = jnp.asarray(release.to_flax_layout(value))
    return variables


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_train_mode_block_of_every_placement(placement):
    """One TSM bottleneck (shift, convs, attention, residual) in train mode: output, running
    statistics and the gradients of every parameter and of the input."""
    planes, h = 4, 6
    ref = torch_reference.Bottleneck(
        4 * planes, planes, num_segments=SEGMENTS, shift="blockres", attention=placement
    )
    torch_reference.randomize_(ref, PLACEMENTS.index(placement))
    block = models.Bottleneck(
        planes=planes, form="TSM", num_segments=SEGMENTS, attention=placement, shift=True
    )
    rng = np.random.default_rng(5)
    x_torch = rng.normal(size=(2 * SEGMENTS, 4 * planes, h, h)).astype(np.float32)
    weights = rng.normal(size=x_torch.shape).astype(np.float32)
    x_flax = jnp.asarray(np.transpose(x_torch, (0, 2, 3, 1)))
    variables = _block_variables(block, x_flax, ref.state_dict())

    def torch_loss(out):
        return (out * torch.from_numpy(weights).to(out.dtype)).sum()

    exact = copy.deepcopy(ref).double()
    exact_grads = _torch_grads(exact, x_torch.astype(np.float64), torch_loss, input_grad=True)[1]
    want, want_grads = _torch_grads(ref, x_torch, torch_loss, input_grad=True)

    w_flax = jnp.asarray(np.transpose(weights, (0, 2, 3, 1)))

    def loss(params, x):
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        y, updates = block.apply(v, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y * w_flax), (y, updates)

    (grads, dx), (got, updates) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(
        variables["params"], x_flax
    )
    assert _rel_err(np.transpose(np.asarray(got), (0, 3, 1, 2)), want) < 1e-5
    for path, value in jax.tree_util.tree_flatten_with_path(updates["batch_stats"])[0]:
        key = release.torch_key("batch_stats", tuple(p.key for p in path))
        if key.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(value, ref.state_dict()[key], rtol=1e-4, atol=1e-5)
    got_grads = {
        release.torch_key("params", tuple(p.key for p in path)): release.to_torch_layout(
            np.asarray(g)
        )
        for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
    }
    got_grads["input"] = np.transpose(np.asarray(dx), (0, 3, 1, 2))
    _assert_gradients_match(got_grads, want_grads, exact_grads)


# Whole networks of each kind: plain, one unit, two units in sequence and summed, both forms.
TRAIN_NAMES = [
    "C2D",
    "TSM",
    "C2D_C_BN",
    "TSM_CinST_BN",
    "C2D_STinC_BN",
    "TSM_ST2C_BN",
    "TSM_CinST2STinC_BN",
    "C2D_STinCplusCinST_BN",
]


@pytest.mark.parametrize("name", TRAIN_NAMES)
def test_train_mode_logits_running_statistics_and_gradients(name):
    """Batch-statistics logits, the running statistics they move, and the cross-entropy gradient
    of every parameter, as the reference's `loss.backward()` gives them.

    Dropout differs in its random draws between frameworks, so train mode is compared with
    dropout 0, which also exercises the release's `base_model.fc` head.
    """
    ref, model, variables = _pair(name, dropout=0.0, seed=1)
    x_torch, x_flax = _clips(1)
    labels = np.array([3, 5])

    def cross_entropy(logits):
        return torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))

    want, want_grads = _torch_grads(ref, x_torch, cross_entropy)
    # (`ref` ran in train mode once: its running statistics moved once, as Flax's do.)
    exact = copy.deepcopy(ref).double()
    exact_grads = _torch_grads(exact, x_torch.astype(np.float64), cross_entropy)[1]

    def loss(params):
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        logits, updates = model.apply(v, x_flax, train=True, mutable=["batch_stats"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels))
        return ce.mean(), (logits, updates)

    grads, (got, updates) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    assert _rel_err(np.asarray(got), want) < 1e-5

    # The running statistics move the same way (momentum 0.1 in torch = 0.9 in Flax; the
    # variance by the unbiased batch variance, as torch moves it).
    new_state = {"module." + k: v.numpy() for k, v in ref.state_dict().items()}
    converted = release.to_torch({"params": variables["params"], **updates}, model)
    for key, value in converted.items():
        if key.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(value, new_state[key], rtol=1e-4, atol=1e-5, err_msg=key)

    got_grads = release.to_torch({"params": grads, "batch_stats": updates["batch_stats"]}, model)
    prefixed = lambda d: {"module." + k: v for k, v in d.items()}  # noqa: E731
    _assert_gradients_match(got_grads, prefixed(want_grads), prefixed(exact_grads))


def test_resnet101_alternate_block_rule():
    ref, model, variables = _pair("TSM_CinST_BN", depth=101, width=8, seed=2)
    x_torch, x_flax = _clips(2)
    with torch.no_grad():
        want = ref.eval()(torch.from_numpy(x_torch)).numpy()
    got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x_flax))
    assert _rel_err(got, want) < 1e-5


def test_block_shift_variant():
    ref, model, variables = _pair("TSM_STinC_BN", shift_place="block", seed=3)
    x_torch, x_flax = _clips(3)
    with torch.no_grad():
        want = ref.eval()(torch.from_numpy(x_torch)).numpy()
    got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x_flax))
    assert _rel_err(got, want) < 1e-5
