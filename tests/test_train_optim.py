"""Optimiser parameter groups, learning-rate schedules and the linear scaling rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aia_jax.train import optim

OPT = dict(
    lr=0.01,
    reference_batch_size=40,
    momentum=0.9,
    weight_decay=1e-4,
    schedule="step",
    lr_steps=(20, 40),
    lr_decay=0.1,
    warmup_epochs=0,
    clip_grad_norm=20.0,
    partial_bn=False,
)


def toy_params():
    """The shape of a VideoNet's parameter tree, with every kind of layer it has."""
    ones = lambda *s: jnp.ones(s, jnp.float32)  # noqa: E731
    return {
        "base_model": {
            "conv1": {"kernel": ones(3, 3, 3, 4)},
            "bn1": {"scale": ones(4), "bias": ones(4)},
            "layer1_0": {
                "conv1": {"kernel": ones(1, 1, 4, 4)},
                "bn1": {"scale": ones(4), "bias": ones(4)},
                "eft": {
                    "C_conv": {"kernel": ones(3, 3, 3, 2, 1)},
                    "C_bn": {"scale": ones(1), "bias": ones(1)},
                },
            },
        },
        "new_fc": {"kernel": ones(4, 5), "bias": ones(5)},
    }


def test_param_groups():
    labels = optim.param_labels(toy_params())
    assert labels["base_model"]["conv1"]["kernel"] == "weight"
    assert labels["base_model"]["bn1"] == {"scale": "bn", "bias": "bn"}
    assert labels["base_model"]["layer1_0"]["bn1"]["bias"] == "bn"
    assert labels["base_model"]["layer1_0"]["eft"]["C_conv"]["kernel"] == "weight"
    assert labels["base_model"]["layer1_0"]["eft"]["C_bn"]["scale"] == "bn"
    assert labels["new_fc"] == {"kernel": "weight", "bias": "bias"}


def test_partial_bn_freezes_all_backbone_bns_but_the_first():
    labels = optim.param_labels(toy_params(), partial_bn=True)
    assert labels["base_model"]["bn1"] == {"scale": "bn", "bias": "bn"}
    assert labels["base_model"]["layer1_0"]["bn1"] == {"scale": "frozen", "bias": "frozen"}
    assert labels["base_model"]["layer1_0"]["eft"]["C_bn"]["scale"] == "bn"
    assert labels["new_fc"]["kernel"] == "weight"


def _one_update(cfg, params, grads, lr=0.5):
    tx = optim.make_optimizer(cfg, params, optax.constant_schedule(lr))
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_group_learning_rates_and_decay():
    """First SGD step: -lr·mult·(g + wd·w) with wd only on weights (torch SGD semantics)."""
    params = toy_params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    cfg = dict(OPT, weight_decay=0.01, clip_grad_norm=0)
    up = _one_update(cfg, params, grads)
    np.testing.assert_allclose(up["new_fc"]["kernel"], -0.5 * (0.1 + 0.01), rtol=1e-6)
    np.testing.assert_allclose(up["new_fc"]["bias"], -0.5 * 2 * 0.1, rtol=1e-6)
    np.testing.assert_allclose(up["base_model"]["bn1"]["scale"], -0.5 * 0.1, rtol=1e-6)
    frozen = _one_update(dict(cfg, partial_bn=True), params, grads)
    np.testing.assert_array_equal(frozen["base_model"]["layer1_0"]["bn1"]["scale"], 0.0)
    np.testing.assert_allclose(frozen["base_model"]["bn1"]["scale"], -0.5 * 0.1, rtol=1e-6)


def test_momentum_matches_torch_sgd():
    """buf = m·buf + g; p -= lr·buf — the second step moves by lr·(m·g1 + g2)."""
    params = {"w": {"kernel": jnp.zeros(3)}}
    tx = optim.make_optimizer(
        dict(OPT, weight_decay=0.0, clip_grad_norm=0), params, optax.constant_schedule(0.1)
    )
    state = tx.init(params)
    g1, g2 = {"w": {"kernel": jnp.ones(3)}}, {"w": {"kernel": jnp.full(3, 2.0)}}
    _, state = tx.update(g1, state, params)
    up, _ = tx.update(g2, state, params)
    np.testing.assert_allclose(up["w"]["kernel"], -0.1 * (0.9 * 1 + 2), rtol=1e-6)


def test_clipping_by_global_norm_excludes_frozen():
    params = toy_params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 10.0), params)
    cfg = dict(OPT, weight_decay=0.0, clip_grad_norm=1.0, partial_bn=True)
    labels = optim.param_labels(params, partial_bn=True)
    live = [g for g, lab in zip(jax.tree.leaves(grads), jax.tree.leaves(labels)) if lab != "frozen"]
    norm = float(optax.tree.norm(live))
    up = _one_update(cfg, params, grads, lr=1.0)
    np.testing.assert_allclose(up["base_model"]["conv1"]["kernel"], -10.0 / norm, rtol=1e-5)


def test_linear_scaling():
    assert optim.scaled_learning_rate(0.01, 40, 40) == pytest.approx(0.01)
    assert optim.scaled_learning_rate(0.01, 40, 160) == pytest.approx(0.04)
    assert optim.scaled_learning_rate(0.01, 40, 8) == pytest.approx(0.002)


def test_step_schedule():
    sched = optim.make_schedule(OPT, steps_per_epoch=10, num_epochs=50, global_batch_size=80)
    lr = lambda s: float(sched(s))  # noqa: E731
    assert lr(0) == pytest.approx(0.02)
    assert lr(199) == pytest.approx(0.02)
    assert lr(200) == pytest.approx(0.002)
    assert lr(399) == pytest.approx(0.002)
    assert lr(400) == pytest.approx(0.0002)


def test_cosine_schedule_with_warmup():
    cfg = dict(OPT, schedule="cosine", warmup_epochs=1)
    sched = optim.make_schedule(cfg, steps_per_epoch=10, num_epochs=10, global_batch_size=40)
    lr = lambda s: float(sched(s))  # noqa: E731
    assert lr(0) == pytest.approx(0.01 * 0.1 * np.cos(0) * 1.0, rel=1e-5)
    assert lr(4) == pytest.approx(0.01 * 0.5 * (1 + np.cos(np.pi * 4 / 100)) * 0.5, rel=1e-5)
    assert lr(50) == pytest.approx(0.01 * 0.5 * (1 + np.cos(np.pi * 0.5)), rel=1e-5)
    assert lr(100) == pytest.approx(0.0, abs=1e-9)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="schedule"):
        optim.make_schedule(
            dict(OPT, schedule="poly"), steps_per_epoch=1, num_epochs=1, global_batch_size=1
        )
