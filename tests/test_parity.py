"""The Flax networks equal the independent PyTorch implementation of the release.

Every placement on C2D and TSM, eval mode (running statistics) and train mode (batch
statistics): logits, running statistics and the gradient of the loss with respect to every
parameter, float32, random inputs and random weights (every parameter and buffer), plus
ResNet-101's alternate-block rule. Weights go through `aia_jax.convert.from_torch`.
"""

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


@pytest.mark.parametrize("name", NAMES)
def test_train_mode_logits_and_running_means(name):
    # Dropout differs in its random draws between frameworks, so train mode is compared with
    # dropout 0, which also exercises the release's `base_model.fc` head.
    ref, model, variables = _pair(name, dropout=0.0, seed=1)
    x_torch, x_flax = _clips(1)
    with torch.no_grad():
        want = ref.train()(torch.from_numpy(x_torch)).numpy()
    got, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x_flax
    )
    assert _rel_err(np.asarray(got), want) < 1e-5
    # The running means move the same way (momentum 0.1 in torch = 0.9 in Flax).
    new_state = {k: v.numpy() for k, v in ref.state_dict().items()}
    converted = release.to_torch({"params": variables["params"], **updates}, model)
    for key, value in converted.items():
        if key.endswith("running_mean"):
            want_mean = new_state[key.removeprefix("module.")]
            np.testing.assert_allclose(value, want_mean, rtol=1e-4, atol=1e-5, err_msg=key)


# Plain backbones, one- and two-unit placements, sequential and summed, on both 2D forms.
GRADIENT_NAMES = [
    "C2D",
    "TSM",
    "C2D_C_BN",
    "TSM_CinST_BN",
    "C2D_STinC_BN",
    "TSM_ST2C_BN",
    "TSM_CinST2STinC_BN",
    "C2D_STinCplusCinST_BN",
]


@pytest.mark.parametrize("name", GRADIENT_NAMES)
def test_train_mode_gradients(name):
    """Cross-entropy gradients of every parameter equal `loss.backward()` of the reference.

    The reference runs in float64, so that what is compared is Flax's float32 error alone.
    The worst tensors are the gate BatchNorms' biases: their gradient is a sum over every
    position that nearly cancels (down to 1e-4 of the typical gradient), so their error is
    bounded by the whole gradient's size, not their own: it reaches 2.5e-3 of their own size
    (torch's own float32 gives 6e-4 there; the plain `xla` attention path is no better than
    `fused`).
    """
    ref, model, variables = _pair(name, dropout=0.0, seed=4)
    x_torch, x_flax = _clips(4)
    labels = np.array([3, 5])
    ref = ref.double().train()
    logits = ref(torch.from_numpy(x_torch).double())
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
    want = {"module." + k: p.grad.numpy() for k, p in ref.named_parameters()}

    def loss(params):
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        logits, _ = model.apply(v, x_flax, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)).mean()

    grads = jax.jit(jax.grad(loss))(variables["params"])
    got = release.to_torch({"params": grads, "batch_stats": variables["batch_stats"]}, model)
    assert set(want) <= set(got)
    errors = {k: np.linalg.norm(np.asarray(got[k], np.float64) - v) for k, v in want.items()}
    scale = np.sqrt(sum(np.sum(v**2) for v in want.values()))
    # Over all parameters: ~2e-6 relative; 8e-5 for the two-unit net, where torch's own
    # float32 gradient is as far from its float64 one.
    assert np.sqrt(sum(e**2 for e in errors.values())) < 2e-4 * scale
    for key, value in want.items():
        assert errors[key] < 1e-3 * np.linalg.norm(value) + 1e-6 * scale, key


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
