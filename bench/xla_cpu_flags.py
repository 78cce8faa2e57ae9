"""XLA:CPU flag sets tried on the training step and the inference of one network (CPU only).

    python bench/xla_cpu_flags.py                       # TSM_CinST_BN, batch 1, f32
    python bench/xla_cpu_flags.py --name TSM --reps 5

XLA:CPU's convolutions (and their gradients) are what keeps the JAX training step behind the
PyTorch one on CPU (bench/RESULTS.md). This script times the same jitted step (common.py) under
each candidate `XLA_FLAGS` set, each in a fresh subprocess (flags are read once per process),
so that the effect of the oneDNN / XNNPACK / YNNPACK paths of jax's XLA can be seen side by
side. A flag set that fails to compile or run is reported as such, not skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn custom calls": (
        "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true"
    ),
    "no xnnpack": "--xla_cpu_use_xnnpack=false",
    "fast math": "--xla_cpu_enable_fast_math=true",
    "no concurrency scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=false",
}


# Each set runs with exactly its flags, not with those train.py adds (aia_jax.xla_cpu).
os.environ["AIA_JAX_XLA_CPU_FLAGS"] = "0"


def child(args: argparse.Namespace) -> None:
    """Runs in the subprocess: compile and time one step, print one JSON line."""
    import common
    import jax.numpy as jnp

    out = {}
    clips = common.jax_clips(args.batch, args.frames, args.size)
    labels = jnp.arange(args.batch, dtype=jnp.int32) % common.NUM_CLASSES
    model = common.jax_model(args.name, args.dtype, args.frames, args.impl)
    variables = common.jax_variables(model, clips)
    fns = {}
    for mode in ("infer", "train"):
        fns[mode], _, out[f"{mode}_compile_s"] = common.compiled_runner(
            model, variables, clips, labels, mode
        )
    times = common.interleaved(fns, args.warmup, args.reps)
    for k, ts in times.items():
        out[f"{k}_ms_median"], out[f"{k}_ms_min"] = common.median_ms(ts), common.min_ms(ts)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="TSM_CinST_BN")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--impl", default=None, help="attention impl (default: the library's)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sets", default=",".join(FLAG_SETS), help="names of FLAG_SETS")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import common

    common.print_environment(common.environment())
    forwarded = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("sets", "child")]
    forwarded = [f for f in forwarded if not f.endswith("=None")]
    rows = []
    for name in args.sets.split(","):
        env = dict(os.environ, XLA_FLAGS=FLAG_SETS[name])
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", *forwarded],
            env=env,
            capture_output=True,
            text=True,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append((name, None, f"failed (exit {proc.returncode}): {last[:120]}"))
        else:
            rows.append((name, json.loads(lines[-1][7:]), ""))
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)

    print(f"\n{args.name}, {args.dtype}, batch {args.batch}, {args.frames}×{args.size}²\n")
    head = "| XLA_FLAGS | infer ms median (min) | train ms median (min) |"
    head += " compile s (infer / train) |"
    print(head + "\n|---|---|---|---|")
    for name, r, err in rows:
        flags = f"`{FLAG_SETS[name]}`" if FLAG_SETS[name] else "(none)"
        if r is None:
            print(f"| {flags} | {err} | | |")
            continue
        print(
            f"| {flags} | {r['infer_ms_median']:.0f} ({r['infer_ms_min']:.0f}) |"
            f" {r['train_ms_median']:.0f} ({r['train_ms_min']:.0f}) |"
            f" {r['infer_compile_s']:.1f} / {r['train_compile_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
