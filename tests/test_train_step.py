"""The jitted train step: sharded over 8 devices == one device; accumulation; partial BN; bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aia_jax import models
from aia_jax.errors import UserError
from aia_jax.train import mesh as mesh_lib
from aia_jax.train import optim
from aia_jax.train import step as step_lib

T, S, CLASSES = 4, 32, 5
OPT = dict(
    lr=0.1,
    reference_batch_size=8,
    momentum=0.9,
    weight_decay=1e-4,
    schedule="step",
    lr_steps=(),
    warmup_epochs=0,
    clip_grad_norm=20.0,
    partial_bn=False,
)


def normalize(video, dtype):
    return ((video.astype(jnp.float32) / 255.0 - 0.45) / 0.225).astype(dtype)


def setup(
    partial_bn=False,
    dtype=jnp.float32,
    accum=1,
    name="TSM_CinST_BN",
    dropout=0.5,
    param_dtype=jnp.float32,
):
    model = models.create(
        name,
        num_classes=CLASSES,
        num_segments=T,
        depth=14,
        width=8,
        dropout=dropout,
        dtype=dtype,
        param_dtype=param_dtype,
        partial_bn=partial_bn,
    )
    dummy = jnp.zeros((1, T, S, S, 3), dtype)
    variables = jax.jit(lambda k: model.init(k, dummy, train=False))(jax.random.PRNGKey(0))
    cfg = dict(OPT, partial_bn=partial_bn)
    sched = optim.make_schedule(cfg, steps_per_epoch=10, num_epochs=1, global_batch_size=8)
    tx = optim.make_optimizer(cfg, variables["params"], sched)
    state = step_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        rng=jax.random.PRNGKey(1),
    )
    state = jax.device_get(state)  # host copies: the jitted step donates its device input
    fn = step_lib.make_train_step(
        model, tx, normalize=normalize, compute_dtype=dtype, grad_accum_steps=accum
    )
    return state, fn


def batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "video": rng.integers(0, 256, (n, T, S, S, 3), dtype=np.uint8),
        "label": rng.integers(0, CLASSES, (n,), dtype=np.int32),
    }


def run_steps(state, fn, batches, devices):
    mesh = mesh_lib.make_mesh(devices)
    sharding = step_lib.state_sharding(state, mesh)
    jitted = step_lib.jit_train_step(fn, mesh, sharding)
    state = jax.device_put(state, sharding)
    metrics = []
    for b in batches:
        state, m = jitted(state, jax.device_put(b, mesh_lib.batch_sharded(mesh)))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


def assert_same_step(before, a, b, leaf_rel=0.5, total_rel=1e-3):
    """`a` and `b` made the same change to `before`, up to float32 rounding.

    Compared relative to the change itself: most backbone gradients are tiny at initialisation
    (the classifier starts at std 0.001), so their float32 rounding, which depends on how the
    batch is split over devices, is large relative to them and small relative to the update as
    a whole. A semantic difference (per-device BatchNorm statistics, a gradient summed instead
    of averaged, another dropout mask) changes the update by O(1).
    """
    before, a, b = (jax.tree.leaves(t) for t in (before, a, b))
    diff = [np.asarray(x, np.float64) - y for x, y in zip(a, b)]
    change = [np.asarray(x, np.float64) - y for x, y in zip(a, before)]
    for d, c in zip(diff, change):
        assert np.abs(d).max() <= leaf_rel * np.abs(c).max() + 1e-7
    total = np.sqrt(sum((d**2).sum() for d in diff) / sum((c**2).sum() for c in change))
    print(f"relative difference of the updates: {total:.2e}")
    assert total <= total_rel, total


def test_eight_devices_equal_one():
    """The default network, float32: the sharded step makes the single-device update."""
    assert jax.device_count() == 8
    state, fn = setup()
    batches = [batch(32, seed=s) for s in range(2)]  # 4 clips per device
    one, m1 = run_steps(state, fn, batches, jax.devices()[:1])
    eight, m8 = run_steps(state, fn, batches, jax.devices())
    assert int(one.step) == int(eight.step) == 2
    assert_same_step(state.params, one.params, eight.params, total_rel=1e-4)
    assert_same_step(state.batch_stats, one.batch_stats, eight.batch_stats, total_rel=1e-4)
    for key in ("loss", "top1", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in m1], [m[key] for m in m8], rtol=1e-5)


def test_eight_devices_equal_one_float64():
    """In float64 the sharded and single-device steps agree to rounding: the semantics are
    equal, gradient accumulation included. (TSM: the attention's fused kernels are float32.)"""
    accum = 2
    with jax.enable_x64(True):
        state, fn = setup(name="TSM", dtype=jnp.float64, param_dtype=jnp.float64, accum=accum)
        batches = [batch(16 * accum, seed=s) for s in range(2)]  # 2 clips per device
        one, m1 = run_steps(state, fn, batches, jax.devices()[:1])
        eight, m8 = run_steps(state, fn, batches, jax.devices())
    assert one.params["new_fc"]["kernel"].dtype == np.float64
    for a, b in [(one.params, eight.params), (one.batch_stats, eight.batch_stats)]:
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12), a, b)
    assert_same_step(state.params, one.params, eight.params, leaf_rel=1e-6, total_rel=1e-9)
    np.testing.assert_allclose([m["loss"] for m in m1], [m["loss"] for m in m8], rtol=1e-6)


def test_accumulation_averages_micro_batch_gradients():
    """accum=2: rows 0::2 then 1::2 run one after the other (BatchNorm statistics updated after
    each), and the optimiser sees the mean of their gradients."""
    model = models.create(
        "TSM", num_classes=CLASSES, num_segments=T, depth=14, width=8, dropout=0.5
    )
    state, fn = setup(name="TSM", accum=2)
    b = batch(16)
    new, m = run_steps(state, fn, [b], jax.devices()[:1])

    def micro_grad(params, batch_stats, k):
        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": batch_stats},
                normalize(jnp.asarray(b["video"][k::2]), jnp.float32),
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.fold_in(jax.random.fold_in(state.rng, 0), k)},
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, b["label"][k::2])
            return loss.mean(), upd["batch_stats"]

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (l0, stats0), g0 = jax.jit(micro_grad, static_argnums=2)(state.params, state.batch_stats, 0)
    (l1, stats1), g1 = jax.jit(micro_grad, static_argnums=2)(state.params, stats0, 1)
    np.testing.assert_allclose(m[0]["loss"], (l0 + l1) / 2, rtol=1e-5)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
        new.batch_stats,
        jax.device_get(stats1),
    )
    cfg = dict(OPT)
    tx = optim.make_optimizer(
        cfg,
        state.params,
        optim.make_schedule(cfg, steps_per_epoch=10, num_epochs=1, global_batch_size=8),
    )
    grads = jax.tree.map(lambda x, y: (x + y) / 2, g0, g1)
    updates, _ = tx.update(grads, tx.init(state.params), state.params)
    expected = optax.apply_updates(state.params, updates)
    assert_same_step(state.params, jax.device_get(expected), new.params, total_rel=1e-4)


def test_partial_bn_freezes_statistics_and_parameters():
    state, fn = setup(partial_bn=True)
    new, _ = run_steps(state, fn, [batch(8)], jax.devices())
    stem_before, stem_after = (
        state.batch_stats["base_model"]["bn1"],
        new.batch_stats["base_model"]["bn1"],
    )
    assert not np.allclose(stem_before["mean"], stem_after["mean"])
    blk = ("base_model", "layer1_0", "bn1")
    get = lambda t: t[blk[0]][blk[1]][blk[2]]  # noqa: E731
    np.testing.assert_array_equal(get(state.batch_stats)["mean"], get(new.batch_stats)["mean"])
    np.testing.assert_array_equal(get(state.batch_stats)["var"], get(new.batch_stats)["var"])
    np.testing.assert_array_equal(get(state.params)["scale"], get(new.params)["scale"])
    assert not np.allclose(
        state.params["base_model"]["bn1"]["scale"], new.params["base_model"]["bn1"]["scale"]
    )


def test_logged_grad_norm_leaves_out_frozen_batchnorms():
    """With partial BN the logged norm is the one clipping sees, not the frozen BNs' too."""
    state, fn = setup(partial_bn=True, dropout=0.0, name="TSM")
    # A classifier of weight 0.3 rather than the release's 0.001, so that the backbone's
    # BatchNorms get gradients large enough to show in the norm.
    fc = dict(state.params["base_model"]["fc"])
    fc["kernel"] = 0.3 * np.random.default_rng(0).standard_normal(fc["kernel"].shape, np.float32)
    params = {**state.params, "base_model": {**state.params["base_model"], "fc": fc}}
    state = state.replace(params=params)
    b = batch(8)
    _, (metrics,) = run_steps(state, fn, [b], jax.devices()[:1])
    model = models.create(
        "TSM", num_classes=CLASSES, num_segments=T, depth=14, width=8, dropout=0.0,
        partial_bn=True,
    )  # fmt: skip

    def loss(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        clips = normalize(jnp.asarray(b["video"]), jnp.float32)
        logits, _ = model.apply(variables, clips, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean()

    grads = jax.jit(jax.grad(loss))(state.params)
    labels = jax.tree.leaves(optim.param_labels(grads, partial_bn=True))
    squares = {"frozen": 0.0, "used": 0.0}
    for g, label in zip(jax.tree.leaves(grads), labels):
        squares["frozen" if label == "frozen" else "used"] += float(np.sum(np.square(g)))
    assert squares["frozen"] > 1e-2 * squares["used"]  # would show in the norm
    np.testing.assert_allclose(metrics["grad_norm"], np.sqrt(squares["used"]), rtol=1e-4)


def test_bfloat16_compute_keeps_float32_state():
    """bf16 TSM+CinST through the trainer's step (test_models covers bf16 I3D): a
    finite loss and gradient, the gates learn, and the state stays float32."""
    state, fn = setup(dtype=jnp.bfloat16)
    new, m = run_steps(state, fn, [batch(8)], jax.devices())
    assert np.isfinite(m[0]["loss"]) and np.isfinite(m[0]["grad_norm"]) and m[0]["grad_norm"] > 0
    gate = lambda p: p["base_model"]["layer1_0"]["eft"]["T_conv"]["kernel"]  # noqa: E731
    assert np.abs(gate(new.params) - gate(state.params)).max() > 0
    for leaf in jax.tree.leaves((new.params, new.batch_stats)):
        assert leaf.dtype == np.float32


def test_check_batch_size_names_the_key_and_only_what_applies():
    mesh = mesh_lib.make_mesh()  # the 8 fake devices
    with pytest.raises(UserError) as e:
        mesh_lib.check_batch_size(12, mesh, name="eval_batch_size")
    assert str(e.value).startswith("eval_batch_size 12 cannot be split evenly over 8 devices")
    assert "grad_accum_steps" not in str(e.value)  # the evaluation does not accumulate
    with pytest.raises(UserError, match=r"\(batch_size 12 / grad_accum_steps 2\)"):
        mesh_lib.check_batch_size(12, mesh, 2)


def test_process_group_without_a_coordinator_is_refused(monkeypatch):
    """Else every host would train alone, all into the same workdir."""
    for name in (mesh_lib.ENV_COORDINATOR, mesh_lib.ENV_NUM_PROCESSES, mesh_lib.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    for cfg in ({"num_processes": 2, "process_id": 1}, {"process_id": 0}):
        with pytest.raises(UserError, match=r"^distributed.num_processes .* no coordinator_addr"):
            mesh_lib.initialize_distributed(cfg)
    monkeypatch.setenv(mesh_lib.ENV_NUM_PROCESSES, "4")
    with pytest.raises(UserError, match="num_processes 4, process_id -1 but no coordinator"):
        mesh_lib.initialize_distributed({})
    monkeypatch.delenv(mesh_lib.ENV_NUM_PROCESSES)
    mesh_lib.initialize_distributed({"num_processes": 1, "process_id": 0})  # one process
    mesh_lib.initialize_distributed(None)


def test_coordinator_without_a_process_count_is_refused(monkeypatch):
    """A coordinator with no process count (or a process id past it) is said in one line, not
    ignored (each host would train alone) or left to JAX's traceback."""
    for name in (mesh_lib.ENV_COORDINATOR, mesh_lib.ENV_NUM_PROCESSES, mesh_lib.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    address = "127.0.0.1:1"  # never reached: each config is refused before it is used
    for cfg in (
        {"coordinator_address": address, "process_id": 1},
        {"coordinator_address": address},
    ):
        with pytest.raises(UserError, match=r"^distributed.coordinator_address .* no num_proc"):
            mesh_lib.initialize_distributed(cfg)
    monkeypatch.setenv(mesh_lib.ENV_COORDINATOR, address)
    with pytest.raises(UserError, match="no num_processes"):
        mesh_lib.initialize_distributed({"process_id": 0})
    with pytest.raises(UserError, match=r"^distributed.process_id 2 .* expected 0 to 1"):
        mesh_lib.initialize_distributed({"num_processes": 2, "process_id": 2})
    monkeypatch.setenv(mesh_lib.ENV_PROCESS_ID, "one")
    with pytest.raises(UserError, match=r"^environment variable JAX_PROCESS_ID='one': expected"):
        mesh_lib.initialize_distributed({"num_processes": 2})
    monkeypatch.delenv(mesh_lib.ENV_PROCESS_ID)
    mesh_lib.initialize_distributed({"num_processes": 1})  # one process: nothing to join
    assert jax.process_count() == 1


def test_auto_process_group_passes_on_the_fields_that_are_set(monkeypatch):
    """JAX's cluster detection fills in only the arguments left None: a set coordinator (e.g. a
    fixed port), process count or id must reach it, not be dropped."""
    for name in (mesh_lib.ENV_COORDINATOR, mesh_lib.ENV_NUM_PROCESSES, mesh_lib.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    calls: list[dict] = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    address = "10.0.0.1:1234"
    for cfg, expected in (
        ({"auto": True}, {}),
        ({"auto": True, "coordinator_address": address}, {"coordinator_address": address}),
        ({"auto": True, "num_processes": 4, "process_id": -1}, {"num_processes": 4}),
        (
            {"auto": True, "coordinator_address": address, "num_processes": 4, "process_id": 2},
            {"coordinator_address": address, "num_processes": 4, "process_id": 2},
        ),
    ):
        calls.clear()
        mesh_lib.initialize_distributed(cfg)
        assert calls == [expected], cfg
    monkeypatch.setenv(mesh_lib.ENV_PROCESS_ID, "3")  # the environment counts as set too
    calls.clear()
    mesh_lib.initialize_distributed({"auto": True, "coordinator_address": address})
    assert calls == [{"coordinator_address": address, "process_id": 3}]
    with pytest.raises(UserError, match=r"^distributed.process_id 3 .* expected 0 to 1"):
        mesh_lib.initialize_distributed({"auto": True, "num_processes": 2})
