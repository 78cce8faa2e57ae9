"""Where a program's time goes, kernel by kernel: the attention's against the backbone's.

    python bench/kernels.py                                   # TSM ± CinST/STinC training step
    python bench/kernels.py --names TSM,TSM_CinST_BN --mode infer --calls 12
    python bench/kernels.py --unit CinST --size 56 --channels 64 --mode train --calls 30

Every program is compiled first; then the programs run in turn, `--calls` rounds, inside one
`jax.profiler.trace`, so that a drift of the host's speed hits all of them alike. Each call is
wrapped in a `TraceAnnotation`, and every kernel XLA:CPU ran inside it (an instruction of the
compiled entry computation: a fusion, a reduction, a convolution) is attributed to that call.

Per program (medians over the calls): the wall time of a call; the traced kernels' time,
split into the attention's (instructions whose op name is inside an `eft` unit) and the rest;
how long at least one and how long two or more kernels were running at once; and the kernels
per call. Then the `--top` kernels by their median time per call. A kernel's events are those
the trace shows: a YNNPACK convolution that splits its work between threads may appear once
per thread, an XLA loop as one event. Tracing itself can slow a kernel: a unit's inference
gating product ran 3× slower while traced, where other loops over the same map did not
(bench/RESULTS.md §4, session 44); check a surprising figure untraced (`bench/unit.py`).

On the 2-core CPU hosts of bench/RESULTS.md this showed that the attention's cost in a network
is its kernels' time, not idle gaps between them, and that in a training step it also takes
away some of the backbone's kernels running side by side (§3, 2026-12-06, session 30).
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import common
import jax
import jax.numpy as jnp
import numpy as np
import unit as unit_bench

from aia_jax.models import valid_names
from aia_jax.models.attention import UNIT_GATES

_OP_NAME = re.compile(r'metadata=\{[^}]*op_name="([^"]*)"')


def kernel_classes(compiled, everything_is_attention: bool = False) -> dict[str, tuple[str, str]]:
    """`{instruction: (class, shape)}` for the compiled entry computation's instructions.

    The class is 'attention' when the instruction's op name lies inside an attention unit (the
    units are the submodules `eft`, `eft1`, `eft2`), else 'backbone'.
    """
    out = {}
    for name, shape, _, line in unit_bench.entry_instructions(compiled):
        op = _OP_NAME.search(line)
        inside = everything_is_attention or bool(op and re.search(r"/eft\d?(/|$)", op.group(1)))
        out[name] = (
            "attention" if inside else "backbone",
            _short_shape(re.sub(r"\{[^}]*\}", "", shape)),
        )
    return out


def _short_shape(shape: str) -> str:
    """A tuple shape as `n × shape` per distinct element shape (a 54-output reduction is long)."""
    if not shape.startswith("("):
        return shape
    counts = collections.Counter(re.findall(r"\w+\[[^\]]*\]", shape))
    return ", ".join(f"{n} × {s}" if n > 1 else s for s, n in counts.items())


@dataclass
class Program:
    """A compiled program to profile: a callable that runs it once and blocks."""

    name: str
    run: Callable[[], object]
    kernels: dict[str, tuple[str, str]]
    calls: list[dict] = field(default_factory=list)


def _covered(intervals: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Nanoseconds during which at least 1 and at least 2 of `intervals` are open."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    one = two = depth = 0
    last = None
    for t, step in edges:
        if last is not None:
            one += (t - last) * (depth >= 1)
            two += (t - last) * (depth >= 2)
        depth += step
        last = t
    return one, two


def profile(programs: Sequence[Program], calls: int, warmup: int = 3) -> None:
    """Runs the programs in turn under one trace; fills each program's `calls` with its stats."""
    for _ in range(warmup):
        for p in programs:
            p.run()
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            for i in range(calls):
                for p in programs:
                    with jax.profiler.TraceAnnotation(f"profile-call {p.name} {i}"):
                        p.run()
        (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)

    windows, events = [], []
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for ev in line.events:
                if ev.name.startswith("profile-call "):
                    _, name, _ = ev.name.split(" ")
                    windows.append((ev.start_ns, ev.start_ns + ev.duration_ns, name))
                else:
                    events.append((ev.start_ns, ev.duration_ns, ev.name))
    windows.sort()
    by_name = {p.name: p for p in programs}
    starts = np.array([w[0] for w in windows])
    per_call = [collections.defaultdict(list) for _ in windows]
    for start, duration, name in events:
        i = int(np.searchsorted(starts, start, side="right")) - 1
        if i < 0 or start >= windows[i][1]:
            continue
        if name in by_name[windows[i][2]].kernels:
            per_call[i][name].append((start, start + duration))
    for (start, end, name), kernels in zip(windows, per_call, strict=True):
        program = by_name[name]
        intervals = [iv for ivs in kernels.values() for iv in ivs]
        one, two = _covered(intervals)
        time_by = collections.Counter()
        for k, ivs in kernels.items():
            time_by[k] = sum(e - s for s, e in ivs)
        program.calls.append(
            {"wall": end - start, "busy": one, "both": two, "count": len(intervals), "by": time_by}
        )


def summarize(programs: Sequence[Program], top: int) -> None:
    """Prints the per-program table and each program's top kernels (ms per call)."""

    def median(values) -> float:
        return float(np.median(list(values))) / 1e6

    print("\nms per call, medians over the calls; a kernel's time: the sum of its traced events\n")
    print(
        "| program | wall | kernels: attention | kernels: backbone | ≥ 1 kernel running "
        "| ≥ 2 kernels running | kernels running on average | kernels per call |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for p in programs:
        cls = {
            c: [sum(v for k, v in call["by"].items() if p.kernels[k][0] == c) for call in p.calls]
            for c in ("attention", "backbone")
        }
        total = [a + b for a, b in zip(cls["attention"], cls["backbone"], strict=True)]
        running = np.median([t / c["wall"] for t, c in zip(total, p.calls, strict=True)])
        print(
            f"| {p.name} | {median(c['wall'] for c in p.calls):.1f} "
            f"| {median(cls['attention']):.1f} | {median(cls['backbone']):.1f} "
            f"| {median(c['busy'] for c in p.calls):.1f} "
            f"| {median(c['both'] for c in p.calls):.1f} | {running:.2f} "
            f"| {np.median([c['count'] for c in p.calls]):.0f} |"
        )
    for p in programs:
        # Medians over the calls: a host stall can stretch one call of a kernel tenfold.
        names = {k for call in p.calls for k in call["by"]}
        totals = collections.Counter(
            {k: np.median([call["by"].get(k, 0) for call in p.calls]) for k in names}
        )
        # With both classes present, each class's own ranking follows the overall one.
        classes = sorted({p.kernels[k][0] for k in totals})
        for wanted in [None, *classes] if len(classes) > 1 else [None]:
            ranked = [k for k, _ in totals.most_common() if wanted in (None, p.kernels[k][0])]
            print(f"\n{p.name}: top {top} {wanted or 'all'} kernels, µs per call (median)\n")
            print("| kernel | class | shape | µs |")
            print("|---|---|---|---|")
            for k in ranked[:top]:
                cls, shape = p.kernels[k]
                print(f"| {k} | {cls} | {shape} | {totals[k] / 1e3:.0f} |")


def network_programs(names: Sequence[str], mode: str, batch: int, dtype: str) -> list[Program]:
    out = []
    for name in names:
        model = common.jax_model(name, dtype)
        clips = common.jax_clips(batch, 8, 224)
        labels = jnp.zeros((batch,), jnp.int32)
        variables = common.jax_variables(model, clips)
        run, compiled, secs = common.compiled_runner(model, variables, clips, labels, mode)
        print(f"compiled {name} ({mode}) in {secs:.1f} s", flush=True)
        out.append(Program(name, run, kernel_classes(compiled)))
    return out


def unit_program(name: str, shape: tuple[int, ...], mode: str, dtype: str) -> Program:
    built = unit_bench.build(name, "fused", shape, common.DTYPES[dtype])
    compiled = built["compiled"][mode]
    return Program(name, built[mode], kernel_classes(compiled, everything_is_attention=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", type=common.csv, default=["TSM", "TSM_CinST_BN", "TSM_STinC_BN"])
    parser.add_argument(
        "--unit", choices=list(UNIT_GATES), help="profile this attention unit alone instead (fused)"
    )
    parser.add_argument("--size", type=int, default=56, help="--unit: the map's h = w")
    parser.add_argument("--channels", type=int, default=64, help="--unit: the map's channels")
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=sorted(common.DTYPES))
    parser.add_argument("--calls", type=int, default=8, help="profiled rounds")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per program")
    args = parser.parse_args()
    common.check_at_least(parser, args, 1, "size", "channels", "batch", "calls", "top")
    if jax.default_backend() != "cpu":  # kernels of other backends are on other trace planes
        parser.error(
            f"reads XLA:CPU's trace, JAX runs on {jax.default_backend()}: set JAX_PLATFORMS=cpu"
        )
    if len(set(args.names)) != len(args.names):
        parser.error(f"--names: each network once, got {','.join(args.names)}")
    unknown = [n for n in args.names if n not in valid_names()]
    if unknown and not args.unit:
        parser.error(f"--names: unknown {','.join(unknown)}; e.g. TSM, TSM_CinST_BN, C2D_STinC_BN")
    common.print_environment(common.environment())
    if args.unit:
        shape = (args.batch, 8, args.size, args.size, args.channels)
        programs = [unit_program(args.unit, shape, args.mode, args.dtype)]
    else:
        programs = network_programs(args.names, args.mode, args.batch, args.dtype)
    t0 = time.perf_counter()
    profile(programs, args.calls)
    print(f"profiled {args.calls} rounds in {time.perf_counter() - t0:.0f} s")
    summarize(programs, args.top)


if __name__ == "__main__":
    main()
