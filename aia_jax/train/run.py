"""The training loop: `run(config, workdir)`.

One readable loop in the style of big_vision: set up the process group and mesh, build the
model, optimiser and data, resume from the workdir's latest checkpoint (or initialise, optionally
from `init_from`), then step → log → validate → checkpoint until the end, a preemption
(SIGTERM) or a non-finite loss.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from aia_jax import compilation_cache, modelio
from aia_jax.errors import UserError, one_line
from aia_jax.fileio import write_atomically
from aia_jax.train import config as config_lib
from aia_jax.train import mesh as mesh_lib
from aia_jax.train import optim
from aia_jax.train import step as step_lib
from aia_jax.train.checkpoint import BEST_METRIC, Checkpoints, checkpoint_dir
from aia_jax.train.metrics import MetricWriter, Progress, note

CONFIG_FILE = "config.json"


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; the run stopped before saving it."""


class _Preemption:
    """Tells the loop that the job is being stopped (SIGTERM), consistently on every process.

    One process: a SIGTERM handler sets a flag, and so does a first Ctrl-C (SIGINT; a second
    one interrupts at once, without saving). Several: JAX's preemption service (started by
    `jax.distributed.initialize`) sees the signal and makes all processes agree on a step.
    """

    def __init__(self):
        self.multi = jax.process_count() > 1
        self._flag = threading.Event()
        self._previous = self._previous_int = None
        if not self.multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())
            self._previous_int = signal.signal(signal.SIGINT, self._interrupted)

    def _interrupted(self, *_: Any) -> None:
        self._flag.set()
        signal.signal(signal.SIGINT, self._previous_int or signal.default_int_handler)
        print(
            "\nInterrupted: saving after this step, then exiting (Ctrl-C again: stop now, "
            "without saving).",
            file=sys.stderr,
            flush=True,
        )

    def reached(self, step: int) -> bool:
        if self.multi:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service disabled
                return False
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if self._previous_int is not None:
            signal.signal(signal.SIGINT, self._previous_int)


def _dtype(name: str):
    if name not in ("float32", "bfloat16"):
        raise UserError(f"config.dtype {name!r}: expected 'float32' or 'bfloat16'")
    return jnp.dtype(name)


def _to_host(tree: Any) -> Any:
    """Copies replicated arrays to numpy (works when other processes hold devices too)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _put_replicated(tree: Any, sharding: Any) -> Any:
    """Places identical host values on every device of every process."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
        tree,
        sharding,
    )


def _write_json(path: str, obj: Any) -> None:
    write_atomically(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _num_train_examples(data: Any, data_cfg: Any) -> int:
    return int(data.num_train_examples(data_cfg))


def run(
    config: ml_collections.ConfigDict, workdir: str, *, may_restart: bool = False
) -> dict[str, Any]:
    """Trains (or resumes training) as `config` says, writing everything into `workdir`.

    Args:
      config: see `configs/common.py` for the fields.
      workdir: checkpoints, `metrics.jsonl`, TensorBoard events, `config.json`, `model.json`.
        A workdir holding checkpoints is resumed from its latest one; with another
        `num_epochs` the run trains on to the new end (and says so), and one whose latest
        checkpoint is already past that end is refused. A local path: a URL such as
        `gs://…` is refused (mount the bucket instead).
      may_restart: for a command whose command line reproduces the run (`train.py`): after
        compiling its steps into the persistent cache, the process may replace itself by a new
        run of that command line, which reads them back (`compilation_cache.restart_pays`: on
        XLA:CPU a program compiled in the process runs slower). By then the state is restored
        or initialised, but no batch read and nothing saved: the workdir holds at most its
        lock file and an empty checkpoints folder, or the checkpoints it had.

    Returns:
      A summary: `step` reached, `preempted`, last `val_top1`/`val_top5` (when evaluated),
      `best_step`.

    Raises:
      NonFiniteLossError: the loss or gradients became non-finite; the checkpoints in `workdir`
        are the last good ones.
    """
    with contextlib.ExitStack() as cleanup:  # closes the checkpoints (and their lock) on errors
        return _run(config, workdir, cleanup, may_restart=may_restart)


def _run(
    config: ml_collections.ConfigDict,
    workdir: str,
    cleanup: contextlib.ExitStack,
    *,
    may_restart: bool,
) -> dict[str, Any]:
    cfg = config
    check_config(cfg)  # first: a misspelt `distributed` field must not go unnoticed either
    mesh_lib.initialize_distributed(config.get("distributed"))
    from aia_jax import data, models  # after the process group exists
    from aia_jax.data.config import clip_length

    if "://" in workdir:
        # os.path would make `gs://b/run` the local folder `./gs:/b/run` and train into it.
        raise UserError(
            f"workdir {workdir}: a URL; the trainer writes through the local file system, so "
            "give a local path or the bucket's mount point (e.g. gcsfuse)"
        )
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"workdir {workdir}: exists and is not a directory")
    if os.path.isdir(os.path.join(workdir, modelio.VARIABLES_DIR)):
        # Training into it would rewrite its model.json beside the old variables.
        raise UserError(
            f"{workdir}: a model directory (it has {modelio.VARIABLES_DIR}/), not a workdir; "
            "train into a new workdir, with config.init_from pointing here to start from it"
        )
    main = jax.process_index() == 0

    # --- Mesh and batch geometry -------------------------------------------------------------
    mesh = mesh_lib.make_mesh()
    batch_size, accum = cfg.batch_size, cfg.get("grad_accum_steps", 1)
    mesh_lib.check_batch_size(batch_size, mesh, accum)
    eval_batch_size = cfg.get("eval_batch_size") or batch_size
    mesh_lib.check_batch_size(eval_batch_size, mesh, name="eval_batch_size")
    geometry = (
        f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s); global batch {batch_size} = {batch_size // mesh.size} per device"
        + (f" in {accum} accumulation steps" if accum > 1 else "")
    )

    # --- Data ----------------------------------------------------------------------------------
    data_cfg = data.resolve(cfg.data)
    frames = clip_length(data_cfg)
    if cfg.model.num_segments != frames:
        source = (
            f"data.clip_len={data_cfg.clip_len} (data.sampling 'dense3d')"
            if data_cfg.sampling == "dense3d"
            else f"data.num_segments={data_cfg.num_segments}"
        )
        raise UserError(
            f"config.model.num_segments={cfg.model.num_segments} but {source} gives clips of "
            f"{frames} frames; expected the same T (data.clip_len 0 = data.num_segments)"
        )
    num_classes = data.num_classes(data_cfg)
    if data_cfg.classnames:
        data.class_names(data_cfg)  # a missing or short names file fails now, not at evaluation
    steps_per_epoch = _num_train_examples(data, data_cfg) // batch_size
    if steps_per_epoch < 1:
        raise UserError(f"fewer training examples than one batch of batch_size {batch_size}")
    total_steps = max(1, round(cfg.num_epochs * steps_per_epoch))
    eval_epochs = cfg.get("eval_every_epochs", 1.0)
    eval_every = max(1, round(eval_epochs * steps_per_epoch)) if eval_epochs > 0 else 0
    if eval_every:  # a broken val list fails now, not at the first validation
        data.num_eval_examples(data_cfg, "val")
    ckpt_every = cfg.get("checkpoint_every_steps", 0)
    log_every = max(1, cfg.get("log_every_steps", 50))

    # --- Model and optimiser -------------------------------------------------------------------
    compute_dtype = _dtype(cfg.get("dtype", "float32"))
    create_kwargs = dict(
        num_classes=num_classes,
        num_segments=cfg.model.num_segments,
        depth=cfg.model.depth,
        width=cfg.model.width,
        dropout=cfg.model.dropout,
    )
    partial_bn = bool(cfg.optimizer.get("partial_bn", False))
    model = _create_model(
        cfg.model.name,
        **create_kwargs,
        dtype=compute_dtype,
        partial_bn=partial_bn,
        attention_impl=cfg.model.get("attention_impl", models.DEFAULT_IMPL),
        remat=cfg.model.get("remat", False),
    )
    note(geometry)  # only now, so that a bad data or model field is the run's first line
    opt_cfg = cfg.optimizer
    schedule = optim.make_schedule(
        opt_cfg,
        steps_per_epoch=steps_per_epoch,
        num_epochs=cfg.num_epochs,
        global_batch_size=batch_size,
    )
    lr = optim.scaled_learning_rate(opt_cfg.lr, opt_cfg.reference_batch_size, batch_size)
    note(
        f"learning rate {opt_cfg.lr:g} per {opt_cfg.reference_batch_size} clips, scaled "
        f"linearly to {lr:g} for the global batch of {batch_size}; {total_steps} steps "
        f"({cfg.num_epochs:g} epochs of {steps_per_epoch})"
    )

    crop = data_cfg.crop_size
    dummy = jnp.zeros((1, cfg.model.num_segments, crop, crop, 3), compute_dtype)
    rng = jax.random.PRNGKey(cfg.seed)
    init_rng, dropout_rng = jax.random.split(rng)

    def init_variables(key) -> dict[str, Any]:
        variables = model.init({"params": key, "dropout": key}, dummy, train=False)
        return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

    params_shape = jax.eval_shape(init_variables, init_rng)["params"]
    tx = optim.make_optimizer(opt_cfg, params_shape, schedule)

    def init_state(key) -> step_lib.TrainState:
        variables = init_variables(key)
        return step_lib.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(variables["params"]),
            rng=dropout_rng,
        )

    abstract_state = jax.eval_shape(init_state, init_rng)
    state_sharding = step_lib.state_sharding(abstract_state, mesh)
    state_spec = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state,
        state_sharding,
    )
    if main:
        sizes = optim.group_sizes(params_shape, partial_bn=partial_bn)
        note(f"{cfg.model.name}: {sum(sizes.values()):,} parameters; optimiser groups {sizes}")

    # --- Resume, or initialise ----------------------------------------------------------------
    train_iter = data.make_train_iterator(
        data_cfg,
        global_batch_size=batch_size,
        seed=cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    init_from = None
    if cfg.get("init_from") and not os.path.isdir(checkpoint_dir(workdir)):
        # A fresh run: a bad init_from fails now, before anything is written into the workdir.
        init_from = modelio.load_for_init(cfg.init_from, model)
    if main:  # only now: a run that fails its checks above leaves no empty workdir behind
        os.makedirs(workdir, exist_ok=True)
    ckpts = Checkpoints(workdir, keep=cfg.get("keep_checkpoints", 2))
    cleanup.callback(ckpts.close)
    latest = ckpts.latest_step()
    meta = modelio.model_meta(cfg.model.name, **create_kwargs)
    if latest is not None:
        note(f"resuming from {ckpts.directory}/{latest}")
        _check_same_model(workdir, meta)
        _check_same_batch(workdir, batch_size)
        _check_same_data(workdir, cfg)
        _note_changed_length(workdir, cfg, total_steps)
        if latest > total_steps:
            # Else the loop would not run and the run would report itself finished at `latest`.
            raise UserError(
                f"{ckpts.directory}/{latest}: the run in this workdir is past this config's "
                f"last step {total_steps} (num_epochs {cfg.num_epochs:g} × {steps_per_epoch} "
                f"steps per epoch); resume with a larger --config.num_epochs, or use a new "
                "workdir"
            )
        try:
            state = ckpts.restore(latest, state_spec, train_iter)
        except UserError:  # e.g. saved by another number of processes
            raise
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise _resume_error(ckpts, latest, abstract_state, e) from None
    else:
        state = jax.jit(init_state, out_shardings=state_sharding)(init_rng)
        if cfg.get("init_from"):
            if init_from is None:
                init_from = modelio.load_for_init(cfg.init_from, model)
            state = _init_from(cfg.init_from, init_from, state, state_sharding)
    start_step = int(_to_host(state.step))

    # --- Steps ---------------------------------------------------------------------------------
    normalize = data.normalize
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(
            model, tx, normalize=normalize, compute_dtype=compute_dtype, grad_accum_steps=accum
        ),
        mesh,
        state_sharding,
    )
    eval_step = step_lib.jit_eval_step(
        step_lib.make_eval_step(model, normalize=normalize, compute_dtype=compute_dtype), mesh
    )

    # In-training validation follows the release: 1 clip (segment centres) × 1 centre crop,
    # whatever test protocol the data config names for the evaluator.
    val_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    val_cfg.test_clips, val_cfg.test_crops = "single", 1

    # The steps' arguments, shardings included: they are part of the key under which jit
    # finds the programs compiled here.
    def batch_spec(size: int, video: tuple[int, ...], **more: Any) -> dict[str, Any]:
        """`data.to_global` of the iterators' batches (pipeline.TrainSample, EvalSample)."""
        sharding = mesh_lib.batch_sharded(mesh)
        return {
            "video": jax.ShapeDtypeStruct((size, *video), jnp.uint8, sharding=sharding),
            "label": jax.ShapeDtypeStruct((size,), jnp.int32, sharding=sharding),
            **{k: jax.ShapeDtypeStruct((size,), t, sharding=sharding) for k, t in more.items()},
        }

    programs = {
        "training step": lambda: train_step.lower(
            state_spec, batch_spec(batch_size, (frames, crop, crop, 3))
        )
    }
    if eval_every:
        variables_spec = {k: getattr(state_spec, k) for k in ("params", "batch_stats")}
        val_spec = batch_spec(eval_batch_size, data.eval_view_shape(val_cfg), valid=jnp.bool_)
        programs["evaluation step"] = lambda: eval_step.lower(variables_spec, val_spec)

    if start_step < total_steps:
        # After the restore, which refuses a checkpoint of another optimiser or process count
        # in seconds; before the first batch is read or anything is saved.
        _compile(programs, say=print if main else lambda _: None, may_restart=may_restart)

    if main:
        _write_json(os.path.join(workdir, CONFIG_FILE), json.loads(cfg.to_json_best_effort()))
        modelio.write_meta(workdir, meta)

    def evaluate(state: step_lib.TrainState) -> dict[str, float]:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        it = data.make_eval_iterator(
            val_cfg,
            split="val",
            global_batch_size=eval_batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        totals = None
        for batch in it:
            batch = {k: batch[k] for k in ("video", "label", "valid")}
            out = eval_step(variables, data.to_global(batch, mesh))
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        if totals is None:
            return {}
        totals = {k: float(v) for k, v in _to_host(totals).items()}
        n = max(totals["count"], 1.0)
        return {
            "val_top1": totals["top1"] / n,
            "val_top5": totals["top5"] / n,
            "val_loss": totals["loss_sum"] / n,
            "val_count": int(totals["count"]),
        }

    writer = MetricWriter(workdir, resume_step=start_step)
    progress = Progress(total_steps, start_step, batch_size)
    preemption = _Preemption()
    pending: list[dict[str, jax.Array]] = []
    last_val: dict[str, float] = {}
    step = start_step
    preempted = False

    def flush() -> None:
        """Fetches the metrics of the steps since the last flush; stops on non-finite values."""
        if not pending:
            return
        values = [{k: float(v) for k, v in m.items()} for m in _to_host(pending)]
        pending.clear()
        first = step - len(values) + 1
        for i, m in enumerate(values):
            if not all(np.isfinite(m[k]) for k in ("loss", "grad_norm", "param_norm")):
                ckpts.wait()
                good = ckpts.latest_step()
                raise NonFiniteLossError(
                    f"non-finite training loss {m['loss']} (gradient norm {m['grad_norm']}, "
                    f"parameter norm {m['param_norm']}) at step {first + i}; stopping without "
                    "saving it. The last good checkpoint is "
                    f"{'step ' + str(good) if good is not None else 'none'} in "
                    f"{ckpts.directory}. Lower optimizer.lr, raise warmup_epochs or check the data."
                )
        mean = {k: float(np.mean([m[k] for m in values])) for k in values[0]}
        lr = float(schedule(step - 1))
        rate = progress.update(
            step,
            loss=mean["loss"],
            lr=lr,
            top1=mean["top1"],
            **({"val": last_val["val_top1"]} if last_val else {}),
        )
        writer.write(
            step,
            {
                "epoch": step / steps_per_epoch,
                "train/loss": mean["loss"],
                "train/top1": mean["top1"],
                "train/grad_norm": mean["grad_norm"],
                "train/param_norm": values[-1]["param_norm"],
                "lr": lr,
                "clips_per_sec": rate,
            },
        )

    def is_eval_step(step: int) -> bool:
        return eval_every > 0 and (step % eval_every == 0 or step == total_steps)

    def validate(state: step_lib.TrainState) -> None:
        nonlocal last_val
        last_val = evaluate(state)
        if not last_val:
            return
        scalars = {k.replace("val_", "val/"): v for k, v in last_val.items()}
        writer.write(step, {"epoch": step / steps_per_epoch, **scalars})
        progress.write(
            f"step {step}: val top-1 {last_val['val_top1']:.4f} top-5 "
            f"{last_val['val_top5']:.4f} ({last_val['val_count']} videos)"
        )

    train_batches: Iterator[dict[str, np.ndarray]] = iter(train_iter)
    try:
        if latest is not None and is_eval_step(step) and ckpts.metrics(step) is None:
            # Saved by a preemption without its validation (by an older version of the loop):
            # run it now. (The checkpoint stays without metrics, so it does not compete for
            # "best".)
            validate(state)
        while step < total_steps:
            batch = data.to_global(next(train_batches), mesh)
            state, metrics = train_step(state, batch)
            if step == start_step:
                progress.restart_clock()
            pending.append(metrics)
            step += 1

            # Called on every step (the processes' sync point); on the last step the run ends
            # finished anyway, and "resume with the same command" would have nothing to do.
            preempted = preemption.reached(step) and step < total_steps
            evaluate_now = is_eval_step(step)
            save_now = (
                preempted
                or evaluate_now
                or step == total_steps
                or (ckpt_every > 0 and step % ckpt_every == 0)
            )
            if save_now or step % log_every == 0:
                flush()
            if evaluate_now:
                # Before the save, a preemption's included: a checkpoint saved without its
                # metric could never be the best one, even after the resumed run validated it.
                validate(state)
            if save_now:
                metrics = (
                    {BEST_METRIC: last_val[BEST_METRIC]} if evaluate_now and last_val else None
                )
                ckpts.save(step, state, train_iter, metrics=metrics)
            if preempted:
                progress.write(f"Preempted: saved step {step} to {ckpts.directory}; exiting.")
                break
        flush()
    finally:
        try:
            # First: waits for the last asynchronous save while a second SIGTERM is still caught.
            ckpts.close()
        finally:
            preemption.close()
            progress.close()
            writer.close()

    return {"step": step, "preempted": preempted, "best_step": ckpts.best_step(), **last_val}


def _compile(programs: dict[str, Any], *, say: Callable[[str], None], may_restart: bool) -> None:
    """Compiles (or reads from the persistent cache) each `name: () -> jax.stages.Lowered`.

    Ahead of the first batch, so that the steps' calls find them compiled: a silent minute on a
    big network otherwise, and the first validation would stall the run for its own. With
    `may_restart`, restarts the process when it has written programs to the cache (these, or
    the initial state's, compiled before them) and reading them back pays
    (`compilation_cache.restart_pays`): a program compiled after the restart, even one as small
    as the initial state's, would slow the steps again (bench/RESULTS.md §3, session 40).
    """
    cache_dir = compilation_cache.directory()
    *most, last = programs
    say(
        f"Compiling the {', '.join(most) + ' and ' if most else ''}{last}"
        + (f" (or reading them from {cache_dir})." if cache_dir else ".")
    )
    for name, lower in programs.items():
        started, hits = time.perf_counter(), compilation_cache.hits()
        lower().compile()
        how = "read from the cache" if compilation_cache.hits() > hits else "compiled"
        say(f"{name[0].upper() + name[1:]} {how} in {time.perf_counter() - started:.1f} s.")
    if may_restart and compilation_cache.writes() and compilation_cache.restart_pays():
        say(
            "Restarting to run them from the cache: on XLA:CPU a program compiled in the "
            f"process runs slower ({compilation_cache.RESTART_SWITCH}=0 keeps this process)."
        )
        compilation_cache.restart()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_config(cfg: ml_collections.ConfigDict) -> None:
    """Checks the trainer's own fields (the data's are `aia_jax.data.resolve`'s, the model's
    `models.create`'s); raises UserError naming the key."""
    unknown = config_lib.unknown_field(cfg)
    if unknown:
        raise UserError(unknown)
    positive = {"batch_size": cfg.batch_size, "grad_accum_steps": cfg.get("grad_accum_steps", 1)}
    positive["keep_checkpoints"] = cfg.get("keep_checkpoints", 2)
    positive["model.width"] = cfg.model.width
    if cfg.get("eval_batch_size"):
        positive["eval_batch_size"] = cfg.eval_batch_size
    for key, value in positive.items():
        if not _is_number(value) or not isinstance(value, int) or value < 1:
            raise UserError(f"config.{key} {value!r}: expected a positive integer")
    if not _is_number(cfg.num_epochs) or cfg.num_epochs <= 0:
        raise UserError(f"config.num_epochs {cfg.num_epochs!r}: expected a positive number")
    opt = cfg.optimizer
    for key in ("lr", "momentum", "weight_decay", "lr_decay", "clip_grad_norm"):
        if key in opt and (not _is_number(opt[key]) or opt[key] < 0):
            off = " (0 = off)" if key == "clip_grad_norm" else ""
            raise UserError(f"config.optimizer.{key} {opt[key]!r}: expected a number >= 0{off}")
    reference = opt.get("reference_batch_size")
    if not _is_number(reference) or reference <= 0:
        raise UserError(
            f"config.optimizer.reference_batch_size {reference!r}: expected a positive number"
        )
    for name, value in (
        ("optimizer.warmup_epochs", opt.get("warmup_epochs", 0)),
        ("eval_every_epochs", cfg.get("eval_every_epochs", 1.0)),
    ):
        if not _is_number(value) or value < 0:
            raise UserError(f"config.{name} {value!r}: expected a number >= 0")
    steps = opt.get("lr_steps", ())
    if (
        not isinstance(steps, (list, tuple))
        or not all(_is_number(e) and e >= 0 for e in steps)
        or any(a >= b for a, b in zip(steps, steps[1:]))  # a repeat would decay only once
    ):
        raise UserError(
            f"config.optimizer.lr_steps {steps!r}: expected epochs in increasing order, "
            "e.g. (20, 40)"
        )


def _create_model(name: str, **kwargs: Any) -> Any:
    from aia_jax import models

    try:
        return models.create(name, **kwargs)
    except ValueError as e:  # an unknown name, depth, dropout, attention_impl, remat, …
        raise UserError(f"config.model: {one_line(e)}") from None


def _resume_error(
    ckpts: Checkpoints, step: int, abstract_state: step_lib.TrainState, error: Exception
) -> UserError:
    """Why the checkpoint at `step` cannot be resumed: another optimiser, or damage."""
    modelio.quiet_closed_event_loop()
    where = f"{ckpts.directory}/{step}"
    differences = ckpts.state_differences(step, abstract_state)
    if differences:
        # model.json matched the config (or is missing, e.g. only `checkpoints/` was copied):
        # name the network when its own tensors differ, else it is the optimiser.
        network = ckpts.state_differences(step, abstract_state, only=("params", "batch_stats"))
        what = "network" if network else "optimiser"
        return UserError(
            f"{where}: cannot resume it with this config (the {what} differs from the run "
            f"that wrote it: {'; '.join(network or differences)}); use a new workdir"
        )
    earlier = [s for s in ckpts.all_steps() if s < step]
    fallback = (
        f"move it out of {ckpts.directory} to resume from step {max(earlier)}"
        if earlier
        else "it is the only checkpoint; use a new workdir"
    )
    return UserError(
        f"{where}: cannot resume, this checkpoint is damaged or incomplete "
        f"({one_line(error)[:200]}); {fallback}"
    )


def _check_same_model(workdir: str, meta: dict[str, Any]) -> None:
    """Refuses to resume a workdir whose `model.json` describes another network than `meta`."""
    if not os.path.isfile(os.path.join(workdir, modelio.MODEL_JSON)):
        return
    saved = modelio.read_meta(workdir)
    differ = [
        f"{key} {saved.get(key)!r} → {value!r}"
        for key, value in meta.items()
        if key not in ("format", "version", "name") and saved.get(key) != value
    ]
    if modelio.canonical_name(saved["name"]) != modelio.canonical_name(meta["name"]):
        differ.insert(0, f"name {saved['name']!r} → {meta['name']!r}")
    if differ:
        raise UserError(
            f"{os.path.join(workdir, modelio.MODEL_JSON)}: the workdir's checkpoints are of "
            f"another network than this config's ({', '.join(differ)}); use a new workdir, or "
            "the workdir's settings to resume"
        )


def _recorded_config(workdir: str) -> dict[str, Any]:
    """The workdir's `config.json` (the config of its last start), or {} when unreadable."""
    try:
        with open(os.path.join(workdir, CONFIG_FILE)) as f:
            recorded = json.load(f)
    except (OSError, ValueError):  # missing or unreadable: nothing to compare with
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _check_same_batch(workdir: str, batch_size: int) -> None:
    """Refuses to resume a run recorded (its `config.json`) with another global batch size.

    The step count, the epochs it means and the learning-rate schedule all follow from the
    batch size, and so does the data iterator's position. (`grad_accum_steps` only splits the
    same batch; it may change, e.g. to resume on a device with less memory.)
    """
    path = os.path.join(workdir, CONFIG_FILE)
    recorded = _recorded_config(workdir).get("batch_size")
    if recorded is not None and recorded != batch_size:
        raise UserError(
            f"{path}: the run in this workdir has batch_size {recorded}, this config "
            f"{batch_size} (its epochs and learning-rate schedule would no longer match); "
            f"resume with --config.batch_size={recorded}, or use a new workdir"
        )


# The fields that decide which examples a run trains on, by data source: the saved data position
# indexes those examples in the order that `seed` shuffles them. (The validation and test lists,
# workers, prefetch and the like may change on resume.)
_TRAINING_DATA = {
    "frames": ("root", "media_dir", "train_list"),
    "videos": ("root", "media_dir", "train_list"),
    "tfds": ("tfds_name", "train_split", "data_dir"),
    "synthetic": ("synthetic_num_train", "synthetic_seed"),
}
# Where the data lies (rather than which data it is): compared as paths, see `_same_path`.
_LOCATIONS = ("root", "media_dir", "train_list", "data_dir")


def _with_preset(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with its preset's values where left empty (`aia_jax.data.config.fill_from_preset`,
    as training fills them), so that a preset and its own values compare equal."""
    from aia_jax.data.config import fill_from_preset
    from aia_jax.data.errors import DataError

    filled = dict(data)
    with contextlib.suppress(DataError):  # a preset this version lacks: compare as written
        fill_from_preset(filled)
    return filled


def _same_path(key: str, old: str, new: str, old_root: str, new_root: str) -> bool | None:
    """Whether `old` and `new` (config `data.<key>`, as written) name the same path: True, False,
    or None when they differ but `old` is gone (the data set was moved, e.g. staged elsewhere).

    Relative list and media paths hang off their root: as written, they name a file of the data
    set wherever its root lies (the root is compared on its own).
    """
    if old == new or (old and new and os.path.normpath(old) == os.path.normpath(new)):
        return True
    if key == "data_dir" and not (old and new):  # '' is TFDS's default folder, not the cwd
        return False
    relative = key in ("media_dir", "train_list")
    if relative and not (os.path.isabs(old) or os.path.isabs(new)):
        return False
    where_old = os.path.abspath(os.path.join(old_root, old) if relative else old)
    where_new = os.path.abspath(os.path.join(new_root, new) if relative else new)
    if where_old == where_new:  # relative and absolute spellings of one path
        return True
    return None if not os.path.exists(where_old) else False


def _check_same_data(workdir: str, cfg: ml_collections.ConfigDict) -> None:
    """Refuses to resume a run recorded (its `config.json`) with other training data or seed.

    The saved data position is a count of examples read from the recorded training set in the
    order its `seed` shuffles them: with another set (source, preset, list, root, TFDS name or
    split) or seed it would silently index other examples. A recorded root or list path that no
    longer exists is taken as the same data moved, and said. Fields `config.json` lacks are
    not compared.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    recorded = _recorded_config(workdir)

    def refuse(key: str, old: Any, new: Any, why: str) -> NoReturn:
        raise UserError(
            f"{path}: the run in this workdir trained on {key} {old!r}, this config {new!r} "
            f"({why}); resume with --config.{key}={old!r}, or use a new workdir"
        )

    if "seed" in recorded and recorded["seed"] != cfg.seed:
        refuse(
            "seed", recorded["seed"], cfg.seed, "the saved data position is a place in its shuffle"
        )
    if not isinstance(recorded.get("data"), dict):
        return
    old, new = _with_preset(recorded["data"]), _with_preset(cfg.data.to_dict())
    why = "the saved data position counts examples of that training set"

    def differs(key: str) -> NoReturn:
        from_preset = old[key] != recorded["data"].get(key) or new[key] != cfg.data[key]
        if from_preset and old.get("preset", "") != new["preset"]:
            key = "preset"  # name what the user set, not the preset's value of it
        refuse(f"data.{key}", old[key], new[key], why)

    if "source" in old and old["source"] != new["source"]:
        differs("source")
    for key in _TRAINING_DATA.get(new["source"], ()):
        if key not in old or old[key] == new[key]:
            continue
        same = (
            _same_path(key, old[key], new[key], old.get("root", ""), new["root"])
            if key in _LOCATIONS
            else False
        )
        if same is False:
            differs(key)
        if same is None:
            note(
                f"data.{key} {old[key]!r} → {new[key]!r} since the run in this workdir started "
                f"(the old one is gone): resuming on the assumption that the data set moved"
            )


def _note_changed_length(workdir: str, cfg: ml_collections.ConfigDict, total_steps: int) -> None:
    """Says so when a resumed run's `num_epochs` is not the one `config.json` recorded.

    Training on (more epochs after the end, or fewer before it) is allowed; the step schedule's
    decay epochs stay where they were, but a cosine schedule spans the new length, so its
    learning rate changes from the step resumed on.
    """
    recorded = _recorded_config(workdir).get("num_epochs")
    if not _is_number(recorded) or recorded == cfg.num_epochs:
        return
    cosine = cfg.optimizer.get("schedule", "step") == "cosine"
    note(
        f"num_epochs {recorded:g} → {cfg.num_epochs:g} since the run in this workdir started: "
        f"it now ends at step {total_steps}"
        + ("; the cosine schedule spans the new length from here on" if cosine else "")
    )


def _init_from(
    path: str, loaded: dict[str, Any], state: step_lib.TrainState, sharding: step_lib.TrainState
) -> step_lib.TrainState:
    """Copies the matching tensors of `loaded` (`modelio.load_for_init(path, …)`) into a fresh
    state."""
    fresh = _to_host({"params": state.params, "batch_stats": state.batch_stats})
    try:
        merged, copied, kept = modelio.merge_for_init(fresh, loaded)
    except ValueError as e:
        raise UserError(f"init_from={path!r}: {e}") from None
    message = f"init_from {path}: copied {len(copied)} tensors"
    if kept:
        message += f", kept the initial value of {len(kept)}: " + ", ".join(kept[:20])
        message += " …" if len(kept) > 20 else ""
    note(message)
    if not copied:
        raise UserError(f"init_from={path!r}: no tensor matches the model being trained")
    placed = _put_replicated(
        merged, {"params": sharding.params, "batch_stats": sharding.batch_stats}
    )
    return state.replace(params=placed["params"], batch_stats=placed["batch_stats"])
