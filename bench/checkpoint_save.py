"""How long a checkpoint save blocks the training loop: the trainer's handler against Orbax's.

    python bench/checkpoint_save.py                       # TSM+CinST ResNet-50, 8 CPU devices
    python bench/checkpoint_save.py --devices 1 --rounds 3

The trainer's `TrainState` (parameters, BatchNorm statistics, SGD momentum, step, key) is
replicated on every device of a 1-D data mesh, as `aia_jax.train` holds it, and saved three times
by `aia_jax.train.checkpoint.Checkpoints`. Two variants, each in a fresh process (what a save
compiles stays cached in its process), alternating per round so that the host's load falls on
both:

- "one replica": the trainer's handler, which writes each replicated array from one replica;
- "replica-parallel": Orbax's default handler (`ocp.StandardCheckpointHandler()`), which cuts
  every replicated array into one slice per device, each a compiled `lax.slice`.

Per save: "blocked", the seconds `save` takes to return (the loop waits for it: the arrays are
copied to host memory before it returns) and "total", until the files are committed
(`wait_until_finished`). The first save of a process also compiles whatever the save needs.
On CPU `--devices` fakes that many devices (`--xla_force_host_platform_device_count`); on a GPU
or TPU the state is replicated on the devices there are.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import common

HERE = pathlib.Path(__file__).resolve().parent
VARIANTS = ("one replica", "replica-parallel")


def child(variant: str, args: argparse.Namespace) -> dict:
    """Three saves of a replicated state in this process; their times."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import orbax.checkpoint as ocp

    from aia_jax import models
    from aia_jax.train import checkpoint
    from aia_jax.train import mesh as mesh_lib
    from aia_jax.train import step as step_lib

    if variant == "replica-parallel":
        checkpoint._state_handler = ocp.StandardCheckpointHandler
    model = models.create(args.net, num_classes=174, num_segments=8, depth=args.depth)
    clips = jnp.zeros((1, 8, 224, 224, 3))
    shapes = jax.eval_shape(lambda k: model.init(k, clips, train=False), jax.random.key(0))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes["params"])
    stats = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes["batch_stats"])
    tx = optax.sgd(0.01, momentum=0.9)
    state = step_lib.TrainState(
        step=np.zeros((), np.int32),
        params=params,
        batch_stats=stats,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0),
    )
    mesh = mesh_lib.make_mesh(jax.devices())
    state = jax.device_put(state, step_lib.state_sharding(state, mesh))
    saves = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as workdir:
        ckpts = checkpoint.Checkpoints(workdir, keep=args.saves)
        for step in range(1, args.saves + 1):
            t0 = time.perf_counter()
            ckpts.save(step, state, None)
            t1 = time.perf_counter()
            ckpts.wait()
            saves.append({"blocked": t1 - t0, "total": time.perf_counter() - t0})
        ckpts.close()
    leaves = jax.tree.leaves(state)
    return {
        "variant": variant,
        "devices": mesh.size,
        "arrays": len(leaves),
        "mib": sum(x.nbytes for x in leaves) / 2**20,
        "saves": saves,
    }


def seconds(result: dict, key: str) -> tuple[float, float]:
    """`key` ('blocked' or 'total') of a child's first save and the median of its later ones."""
    saves = result["saves"]
    return saves[0][key], statistics.median(s[key] for s in saves[1:])


def run_child(variant: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
    cmd = [sys.executable, __file__, "--child", variant, "--net", args.net]
    cmd += ["--depth", str(args.depth), "--saves", str(args.saves), "--tmp", args.tmp]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent)
    if proc.returncode:
        raise SystemExit(f"{variant}: the child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--net", default="TSM_CinST_BN", help="a model name (models.create)")
    parser.add_argument("--depth", type=int, default=50, choices=(14, 50, 101))
    parser.add_argument("--devices", type=int, default=8, help="CPU devices to fake (CPU only)")
    parser.add_argument("--saves", type=int, default=3, help="saves per process")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per variant")
    parser.add_argument("--tmp", default=None, help="where the checkpoints are written")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    common.check_at_least(parser, args, 1, "devices", "rounds")
    common.check_at_least(parser, args, 2, "saves")  # the first save compiles
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    args.tmp = args.tmp or tempfile.gettempdir()
    results = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            results[variant].append(run_child(variant, args))
    common.print_environment(common.environment())
    first = results[VARIANTS[0]][0]
    print(
        f"{args.net} ResNet-{args.depth}: {first['arrays']} arrays, {first['mib']:.0f} MiB, "
        f"replicated on {first['devices']} device(s); {args.saves} saves per process, seconds\n"
    )
    print(
        "| variant | round | first save: blocked / total | later saves: blocked / total (median) |"
    )
    print("|---|---|---|---|")
    for variant in VARIANTS:
        for n, r in enumerate(results[variant], 1):
            blocked, total = seconds(r, "blocked"), seconds(r, "total")
            print(
                f"| {variant} | {n} | {blocked[0]:.2f} / {total[0]:.2f} "
                f"| {blocked[1]:.2f} / {total[1]:.2f} |"
            )
    print("\nBlocked time, replica-parallel / one replica, per round (same round's processes):")
    for n, (a, b) in enumerate(zip(*(results[v] for v in VARIANTS)), 1):
        (a_first, a_later), (b_first, b_later) = seconds(a, "blocked"), seconds(b, "blocked")
        print(
            f"- round {n}: first save {b_first / a_first:.1f}×, "
            f"later saves {b_later / a_later:.1f}×"
        )


if __name__ == "__main__":
    main()
