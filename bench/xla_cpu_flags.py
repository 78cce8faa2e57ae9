"""XLA:CPU settings tried on the training step and the inference of networks (CPU only).

    python bench/xla_cpu_flags.py                       # TSM_CinST_BN, batch 1, f32
    python bench/xla_cpu_flags.py --names TSM,TSM_CinST_BN --reps 11 \
        --sets "no concurrency scheduler;host memory kept"
    python bench/xla_cpu_flags.py --names TSM --batch 4 --loop 3 \
        --sets "no concurrency scheduler;host memory kept;host memory kept, trimmed above 2 GiB"

XLA reads `XLA_FLAGS` once per process, so each (network, flag set) pair compiles in a
subprocess of its own. The subprocesses are then timed round-robin: the parent asks each in turn
for one repetition while the others wait idle on their pipe, so that a change of the machine's
load lands on every pair alike (sequential runs of the sets drift apart by ±10 % here). The
"vs first set" column is each network's time under a set over its time under the first set, and
the overhead column each network's time over the first network's under the same set: both the
median of the rounds' paired ratios with its 90 % interval (`common.paired_overhead`).
`--loop N` adds a third mode, N training steps dispatched back to back as `train.py` dispatches
them (per step): the heap of a loop that does not wait for each step grows differently from
one that does. A flag set that fails to compile or run is reported as such, not skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

# train.py's scheduler setting (the first of aia_jax.xla_cpu.CPU_FLAGS). Tables before 2026-12-05
# show the deprecated `--xla_cpu_enable_concurrency_optimized_scheduler=false`: the same compiled
# program.
_SCHEDULER = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
_WIDE = "--xla_cpu_prefer_vector_width=512"
_FAST_COMPILE = f"{_SCHEDULER} --xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE"
# Each set: exactly these XLA_FLAGS (not those train.py adds), whether its process also
# applies `aia_jax.xla_cpu.retain_host_memory` (glibc keeps the memory XLA frees), and a glibc
# trim threshold set after it (None: the one retain_host_memory sets).
FLAG_SETS = {
    "default": ("", False, None),
    "onednn": ("--xla_cpu_use_onednn=true", False, None),
    "onednn custom calls": (
        "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
        False,
        None,
    ),
    "no xnnpack": ("--xla_cpu_use_xnnpack=false", False, None),
    "fast math": ("--xla_cpu_enable_fast_math=true", False, None),
    "no concurrency scheduler": (_SCHEDULER, False, None),
    "512-bit vectors": (f"{_SCHEDULER} {_WIDE}", False, None),
    "host memory kept": (_SCHEDULER, True, None),  # what train.py applied until 2026-12-05
    "host memory kept, 512-bit vectors": (f"{_SCHEDULER} {_WIDE}", True, None),
    # What retain_host_memory set before 2026-12-04: the largest int, so glibc trimmed a free
    # top of more than 2 GiB.
    "host memory kept, trimmed above 2 GiB": (_SCHEDULER, True, 2**31 - 1),
    # jaxlib 0.10's own switches, each on top of "host memory kept"; the first one replaces its
    # scheduler by XLA's default. "host memory kept, fast-compile preset" is what train.py applies
    # since 2026-12-05 (all of aia_jax.xla_cpu.CPU_FLAGS).
    "host memory kept, concurrency-optimized scheduler": (
        "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
        True,
        None,
    ),
    "host memory kept, fast-runtime preset": (
        f"{_SCHEDULER} --xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
        True,
        None,
    ),
    "host memory kept, fast-compile preset": (
        f"{_SCHEDULER} --xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE",
        True,
        None,
    ),
    "host memory kept, YNN fusions": (
        f"{_SCHEDULER} --xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce,"
        "individual_convolution,individual_dot",
        True,
        None,
    ),
    # YNNPACK for dot products only: convolutions go back to XLA's own (Eigen) kernels.
    "host memory kept, fast-compile preset, YNN dots only": (
        f"{_SCHEDULER} --xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE "
        "--xla_cpu_experimental_ynn_fusion_type=dot",
        True,
        None,
    ),
    "host memory kept, XNN graph fusion": (
        f"{_SCHEDULER} --xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
        True,
        None,
    ),
    "fast-compile preset": (_FAST_COMPILE, False, None),
}
# train.py's XLA flags with glibc's allocator set through GLIBC_TUNABLES instead of
# `retain_host_memory`: read when the process starts, so arenas can be left per thread.
_KEPT = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"
GLIBC_TUNABLES = {
    "fast-compile preset, glibc: no mmap, no trimming, one arena": (
        f"{_KEPT}:glibc.malloc.arena_max=1"
    ),
    "fast-compile preset, glibc: no mmap, no trimming, arenas per thread": _KEPT,
    "fast-compile preset, glibc: huge pages, no mmap, no trimming, arenas per thread": (
        f"{_KEPT}:glibc.malloc.hugetlb=1"
    ),
}
FLAG_SETS |= {name: (_FAST_COMPILE, False, None) for name in GLIBC_TUNABLES}

os.environ["AIA_JAX_XLA_CPU_FLAGS"] = "0"


def child(args: argparse.Namespace) -> None:
    """Runs in a subprocess: compiles, says READY, then runs once per `infer`/`train` line.

    Each run answers its seconds, minor page faults and system CPU seconds (per step for
    `loop`); at the end of input the process's peak resident set (KiB).
    """
    import ctypes
    import resource
    import time

    import common  # first: it puts the repository on sys.path
    import jax.numpy as jnp

    if args.retain_host_memory:
        from aia_jax import xla_cpu

        if not xla_cpu.retain_host_memory():
            raise SystemExit("retain_host_memory does not apply on this host")
        if args.trim_threshold is not None:
            ctypes.CDLL("libc.so.6").mallopt(xla_cpu._M_TRIM_THRESHOLD, args.trim_threshold)

    clips = common.jax_clips(args.batch, args.frames, args.size)
    labels = jnp.arange(args.batch, dtype=jnp.int32) % common.NUM_CLASSES
    model = common.jax_model(args.names, args.dtype, args.frames, args.impl)
    variables = common.jax_variables(model, clips)
    fns, compile_s = {}, {}
    for mode in ("infer", "train"):
        fns[mode], _, compile_s[mode] = common.compiled_runner(
            model, variables, clips, labels, mode
        )
        for _ in range(args.warmup):
            fns[mode]()
    steps = {"infer": 1, "train": 1, "loop": args.loop}
    fns["loop"] = lambda: fns["train"](args.loop)
    print("READY " + json.dumps(compile_s), flush=True)
    for line in sys.stdin:
        mode = line.strip()
        usage, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fns[mode]()
        seconds = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults, system_s = after.ru_minflt - usage.ru_minflt, after.ru_stime - usage.ru_stime
        n = steps[mode]
        print(f"TIME {seconds / n} {faults / n} {system_s / n}", flush=True)
    print(f"RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)


def _read(proc: subprocess.Popen, tag: str) -> str:
    """The payload of the child's next line that starts with `tag`; raises if it ended."""
    for line in proc.stdout:
        if line.startswith(tag + " "):
            return line[len(tag) + 1 :]
    err = (proc.stderr.read().strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"exit {proc.wait()}: {err[:120]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", default="TSM_CinST_BN", help="networks; the first is the base")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--impl", default=None, help="attention impl (default: the library's)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--loop", type=int, default=0, help="steps of the loop mode (0: none)")
    parser.add_argument("--sets", default=";".join(FLAG_SETS), help="FLAG_SETS names, ';' between")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--retain-host-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trim-threshold", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import common

    names, sets = common.csv(args.names), [s for s in args.sets.split(";") if s]
    for name in names:
        try:
            common.models.parse_name(name)
        except ValueError:
            parser.error(f"--names: unknown {name}; e.g. TSM, TSM_CinST_BN, C2D_STinC_BN")
    if not names or len(set(names)) != len(names):
        parser.error(f"--names: each network once, got {args.names!r}")
    if len(set(sets)) != len(sets):
        parser.error(f"--sets: each set once, got {args.sets!r}")
    unknown = [s for s in sets if s not in FLAG_SETS]
    if unknown or not sets:
        parser.error(f"--sets: unknown {unknown or 'nothing given'}; FLAG_SETS: {list(FLAG_SETS)}")
    common.check_choices(parser, "--dtype", [args.dtype], list(common.DTYPES))
    if args.impl is not None:
        common.check_choices(parser, "--impl", [args.impl], common.models.IMPLS)
    common.check_at_least(parser, args, 1, "batch", "frames", "size", "reps")
    common.check_at_least(parser, args, 0, "warmup", "loop")
    common.print_environment(common.environment())
    skip = ("sets", "child", "names", "retain_host_memory", "trim_threshold")
    modes = ("infer", "train", "loop") if args.loop > 0 else ("infer", "train")
    shared = [f"--{k}={v}" for k, v in vars(args).items() if k not in skip]
    shared = [f for f in shared if not f.endswith("=None")]
    procs, compile_s, failed, peak_rss = {}, {}, {}, {}
    for flag_set in sets:
        xla_flags, retain, trim = FLAG_SETS[flag_set]
        tunables = (
            {"GLIBC_TUNABLES": GLIBC_TUNABLES[flag_set]} if flag_set in GLIBC_TUNABLES else {}
        )
        for name in names:
            key = (name, flag_set)
            proc = subprocess.Popen(
                [sys.executable, __file__, "--child", f"--names={name}", *shared]
                + (["--retain-host-memory"] if retain else [])
                + ([f"--trim-threshold={trim}"] if trim is not None else []),
                env=dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu", **tunables),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:  # compile one at a time: the children share the cores
                compile_s[key] = json.loads(_read(proc, "READY"))
                procs[key] = proc
                print(f"compiled {name} under '{flag_set}'", flush=True)
            except RuntimeError as e:
                failed[key] = f"failed ({e})"
    times = {(key, mode): [] for key in procs for mode in modes}
    # (page faults, system seconds) of each training step, blocked on and in the loop
    faults = {(key, mode): [] for key in procs for mode in modes[1:]}
    for _ in range(args.reps):
        for key, proc in list(procs.items()):
            for mode in modes:
                try:
                    proc.stdin.write(mode + "\n")
                    proc.stdin.flush()
                    seconds, minflt, system_s = _read(proc, "TIME").split()
                    times[(key, mode)].append(float(seconds))
                    if mode != "infer":
                        faults[(key, mode)].append((float(minflt), float(system_s)))
                except (RuntimeError, BrokenPipeError) as e:
                    failed[key] = f"failed while timing ({e})"
                    procs.pop(key)
                    break
    for key, proc in procs.items():
        proc.stdin.close()
        peak_rss[key] = int(_read(proc, "RSS")) / 2**10
        proc.wait()

    print(f"\n{args.dtype}, batch {args.batch}, {args.frames}×{args.size}², {args.reps} rounds")
    if args.loop:
        print(f"loop: {args.loop} training steps dispatched back to back, per step")
    cols = " / ".join(modes)
    head = "\n| network | XLA_FLAGS | " + " | ".join(f"{m} ms median (min)" for m in modes)
    head += f" | vs first set, {cols} | overhead {cols} | compile s (infer / train) |"
    head += "".join(f" {m}: page faults, system ms (median) |" for m in modes[1:])
    head += " peak RSS MiB |"
    ncols = 2 + len(modes) + 3 + len(modes) - 1 + 1
    print(head + "\n" + "|---" * ncols + "|")

    def paired(key: tuple[str, str], base: tuple[str, str]) -> str:
        if key == base or base not in procs:
            return "–"
        return " / ".join(
            common.fmt_overhead(*common.paired_overhead(times[(key, m)], times[(base, m)]))
            for m in modes
        )

    def faults_cell(key: tuple[str, str], mode: str) -> str:
        minflt, system_s = np.median(faults[(key, mode)], axis=0)
        return f" {minflt:,.0f}, {1e3 * system_s:.0f} |"

    for flag_set in sets:
        xla_flags, retain, trim = FLAG_SETS[flag_set]
        flags = f"`{xla_flags}`" if xla_flags else "(none)"
        if retain:
            flags += " + host memory kept"
        if trim is not None:
            flags += f", trim threshold {trim}"
        if flag_set in GLIBC_TUNABLES:
            flags += f" + `GLIBC_TUNABLES={GLIBC_TUNABLES[flag_set]}`"
        for name in names:
            key = (name, flag_set)
            if key not in procs:
                print(f"| {name} | {flags} | {failed.get(key, 'failed')} |" + " |" * (ncols - 3))
                continue
            cells = []
            for mode in modes:
                ts = times[(key, mode)]
                cells.append(f"{common.median_ms(ts):.0f} ({common.min_ms(ts):.0f})")
            c = compile_s[key]
            print(
                f"| {name} | {flags} | {' | '.join(cells)} |"
                f" {paired(key, (name, sets[0]))} | {paired(key, (names[0], flag_set))} |"
                f" {c['infer']:.1f} / {c['train']:.1f} |"
                + "".join(faults_cell(key, m) for m in modes[1:])
                + f" {peak_rss[key]:.0f} |"
            )


if __name__ == "__main__":
    main()
