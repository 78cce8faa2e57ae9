"""Compile time of the networks: tracing, lowering and XLA's compilation, each measured alone.

    python bench/compile_time.py                                 # TSM ± CinST, STinC; 3 reps
    python bench/compile_time.py --phases --reps 1               # where XLA's time goes
    python bench/compile_time.py --placements CinST --baseline /tmp/old   # against a checkout

Every measurement runs in a fresh Python process (nothing cached by JAX or XLA from an earlier
one; the persistent compilation cache is off): `jax.jit(step).trace(…)` (Python → jaxpr),
`.lower()` (jaxpr → StableHLO) and `.compile()` (XLA), for inference and for the training step
of `bench/common.py` (ResNet-50, donated state), with the XLA flags `train.py` uses. A user pays
the sum once per program, on its first run: later runs of the commands read it from the
persistent compilation cache (`aia_jax.compilation_cache`, README).

`--phases` also records the compilation under `jax.profiler` and splits XLA's seconds by the
compiler's own trace events: the HLO pass pipelines, XLA:CPU's fusion emitters and LLVM code
generation (wall time of the outermost event of each; the fusion emitters run on several
threads, so their seconds are summed thread time). Event names are XLA:CPU's (jaxlib 0.10); a
phase XLA does not report shows '–'. The profiler adds a little to the compile time.

`--baseline DIR` runs each measurement also with another checkout's `aia_jax` (e.g. a
`git worktree` of an older commit) first on the import path, alternating with this one, so that
an A/B of a change is not at the mercy of the load between two runs.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

# (column, XLA:CPU trace event): the outermost events of the compiler's phases.
PHASES = (
    ("HLO passes", ("HLO passes through layout assignment", "HLO passes after layout assignment")),
    ("fusion emitters", ("FusionCompiler::Compile",)),
    ("LLVM codegen", ("Codegen",)),
    ("thunks", ("ThunkEmitter::EmitEntryComputation",)),
)


def measure(checkout: str, name: str, mode: str, args: argparse.Namespace) -> dict:
    """One measurement in this process, whose `aia_jax` is `checkout`'s (`import_checkout`)."""
    import common
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_compilation_cache", False)
    model = common.jax_model(name, args.dtype[0], frames=args.frames, impl=args.impl)
    clips = common.jax_clips(args.batch_sizes[0], args.frames, args.size)
    variables = common.jax_variables(model, clips)
    if mode == "train":
        labels = jnp.zeros((clips.shape[0],), jnp.int32)
        jitted = jax.jit(common.train_step_fn(model), donate_argnums=(0,))
        inputs = (common.train_state(variables), clips, labels)
    else:
        jitted, inputs = jax.jit(common.inference_fn(model)), (variables, clips)
    out = {"checkout": checkout, "net": name, "mode": mode}
    t0 = time.perf_counter()
    traced = jitted.trace(*inputs)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as trace_dir:
        if args.phases:
            jax.profiler.start_trace(trace_dir)
        t3 = time.perf_counter()
        compiled = lowered.compile()
        t4 = time.perf_counter()
        if args.phases:
            jax.profiler.stop_trace()
            out |= phase_seconds(trace_dir)
    out |= {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t4 - t3}
    out["hlo_instructions"] = compiled.as_text().count(" = ")
    return out


def import_checkout(checkout: str) -> None:
    """Imports `aia_jax` from `checkout`, before `common` would import this checkout's."""
    sys.path.insert(0, checkout)
    import aia_jax

    where = pathlib.Path(aia_jax.__file__).resolve()
    if not where.is_relative_to(pathlib.Path(checkout).resolve()):
        raise SystemExit(f"{checkout}: aia_jax imported from {aia_jax.__file__}")


def phase_seconds(trace_dir: str) -> dict[str, float | None]:
    """Seconds of each of `PHASES` in the profile written to `trace_dir`."""
    import jax

    (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    totals: collections.Counter[str] = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                # The pass pipelines' events end in the module's name: "… (jit_step)".
                totals[event.name.split(" (")[0]] += event.duration_ns / 1e9
    return {
        column: sum(totals[e] for e in events) if any(e in totals for e in events) else None
        for column, events in PHASES
    }


def run_child(checkout: str, name: str, mode: str, argv: list[str]) -> dict:
    """`measure` in a fresh Python process, without the persistent compilation cache."""
    cmd = [sys.executable, __file__, *argv, "--child", checkout, name, mode]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{name} {mode} ({checkout}): the measurement failed: {tail}")
    return json.loads(lines[-1])


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def main() -> None:
    if "--child" in sys.argv:
        import_checkout(sys.argv[sys.argv.index("--child") + 1])
    sys.path.insert(0, str(HERE))
    import common  # applies train.py's XLA flags before the backend starts

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_flags(parser, timing=False)
    parser.add_argument("--modes", type=common.csv, default=["infer", "train"])
    parser.add_argument("--reps", type=int, default=3, help="fresh processes per program")
    parser.add_argument("--phases", action="store_true", help="split XLA's time by phase")
    parser.add_argument("--baseline", default=None, help="checkout whose aia_jax to time too")
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(forms=["TSM"], dtype=["float32"], batch_sizes=[1])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args)), flush=True)
        return
    common.check_common_flags(parser, args)
    common.check_choices(parser, "--modes", args.modes, ["infer", "train"])
    for flag, values in (("--dtype", args.dtype), ("--batch-sizes", args.batch_sizes)):
        if len(values) != 1:
            parser.error(f"{flag}: one value expected, got {','.join(map(str, values))}")
    checkouts = [str(ROOT)]
    if args.baseline:
        if not (pathlib.Path(args.baseline) / "aia_jax" / "models" / "fused.py").is_file():
            parser.error(f"--baseline {args.baseline}: no aia_jax/models/fused.py there")
        checkouts.insert(0, str(pathlib.Path(args.baseline).resolve()))
    env = common.environment()
    common.print_environment(env)
    names = [common.model_name(f, p) for f in args.forms for p in args.placements]
    results: dict[tuple[str, str, str], list[dict]] = collections.defaultdict(list)
    for _ in range(args.reps):
        for name in names:
            for mode in args.modes:
                for checkout in checkouts:
                    row = run_child(checkout, name, mode, sys.argv[1:])
                    print(json.dumps(row), flush=True)
                    results[(name, mode, checkout)].append(row)
                    if args.json:
                        with open(args.json, "a") as f:
                            f.write(json.dumps({"table": "compile", **row, "env": env}) + "\n")
    print_table(results, args)


def print_table(results: dict[tuple[str, str, str], list[dict]], args: argparse.Namespace) -> None:
    columns = ["trace_s", "lower_s", "compile_s"]
    header = ["net", "mode", "checkout", "trace s", "lower s", "XLA compile s", "total s"]
    if args.phases:
        columns += [c for c, _ in PHASES]
        header += [f"{c} s" for c, _ in PHASES]
    header.append("HLO instructions")
    print(f"\nseconds, median of {args.reps} fresh processes\n")
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for (name, mode, checkout), rows in results.items():
        med = {}
        for c in columns:
            values = [r[c] for r in rows if r.get(c) is not None]
            med[c] = statistics.median(values) if values else None
        total = med["trace_s"] + med["lower_s"] + med["compile_s"]
        cells = [name, mode, "this" if checkout == str(ROOT) else "baseline"]
        cells += [fmt(med[c]) for c in columns[:3]] + [fmt(total)]
        cells += [fmt(med[c]) for c in columns[3:]] + [str(rows[0]["hlo_instructions"])]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
