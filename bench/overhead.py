"""The attention's own cost: each placement's time over the plain backbone, JAX and PyTorch.

    python bench/overhead.py                                   # TSM, f32, batch 1, 5 placements
    python bench/overhead.py --impls xla --placements none,CinST,STinC --reps 3 --no-torch
    python bench/overhead.py --compiler-options xla_cpu_prefer_vector_width=512 --no-torch

Every network of the table (each placement, each JAX `--impls`, and the PyTorch reference) is
built and compiled first, then all are timed round-robin — one repetition of each in turn,
`--reps` times — so that a change of machine load lands on every column alike. The overhead
of a placement is its time over the plain backbone's ('none') of the same framework and impl:
the median of each round's ratio with a 90 % confidence interval (`common.paired_overhead`;
the pair of one round shares that moment's machine load), and the ratio of the minima (the
least disturbed repetitions). A target of "≤ 5 %" is met robustly when the interval's upper
end is within it.

`--compiler-options KEY=VALUE,…` adds, for each JAX impl, the same networks compiled with those
XLA options (`XLA_FLAGS` names without the dashes, for those programs only) as a column of their
own, `jax-fused [KEY=VALUE]`, timed in the same round-robin: an XLA option's A/B in one process,
where a run per `XLA_FLAGS` setting (bench/xla_cpu_flags.py) also compares two processes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os

import common
import jax
import jax.numpy as jnp

DEFAULT_PLACEMENTS = ["none", "CinST", "STinC", "CinST2STinC", "STinCplusCinST"]


def build(args, form: str, dtype: str, batch: int, mode: str) -> tuple[dict, dict]:
    """Compiled steps keyed by (framework, placement); and their compile seconds."""
    fns, compile_s = {}, {}
    clips = common.jax_clips(batch, args.frames, args.size)
    labels = jnp.arange(batch, dtype=jnp.int32) % common.NUM_CLASSES
    options = [("", None)]
    if args.compiler_options:
        label = ",".join(f"{k}={v}" for k, v in args.compiler_options.items())
        options.append((f" [{label}]", args.compiler_options))
    for impl in args.impls:
        for placement in args.placements:
            name = common.model_name(form, placement)
            model = common.jax_model(name, dtype, args.frames, impl)
            variables = common.jax_variables(model, clips)
            for suffix, compiler_options in options:
                key = (f"jax-{impl}{suffix}", placement)
                try:
                    fns[key], _, secs = common.compiled_runner(
                        model, variables, clips, labels, mode, compiler_options
                    )
                except jax.errors.JaxRuntimeError as e:
                    if not compiler_options:
                        raise
                    raise SystemExit(f"--compiler-options: {str(e).splitlines()[0]}") from None
                compile_s[key] = secs
                print(f"compiled {key} in {secs:.1f} s", flush=True)
    if not args.no_torch and form in common.TORCH_FORMS:
        tclips = common.torch_clips(batch, args.frames, args.size)
        tlabels = common.torch_labels(batch)
        for placement in args.placements:
            model = common.torch_model(common.model_name(form, placement), args.frames)
            if mode == "infer":
                fns[("torch", placement)] = common.torch_inference(model, tclips, dtype)
            else:
                fns[("torch", placement)] = common.torch_train_step(model, tclips, tlabels, dtype)
    return fns, compile_s


def _compiler_options(text: str) -> dict[str, str]:
    """`K1=V1,K2=V2` → {K1: V1, K2: V2}; an item without `=` continues the previous value, so
    that list-valued options pass whole (`xla_cpu_experimental_ynn_fusion_type=dot,reduce`)."""
    options, last = {}, None
    for item in common.csv(text):
        key, sep, value = item.partition("=")
        if not sep and last is not None:
            options[last] += "," + item
            continue
        if not sep or not key.lstrip("-"):
            raise argparse.ArgumentTypeError(f"{item!r}: expected KEY=VALUE")
        last = key.lstrip("-")
        options[last] = value
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_flags(parser, impl=False)
    parser.add_argument("--modes", type=common.csv, default=["infer", "train"])
    parser.add_argument("--impls", type=common.csv, default=["fused"], help="fused,xla")
    parser.add_argument(
        "--compiler-options",
        type=_compiler_options,
        default={},
        help="KEY=VALUE,…: also time the JAX networks compiled with these XLA options",
    )
    parser.set_defaults(
        forms=["TSM"], placements=DEFAULT_PLACEMENTS, dtype=["float32"], batch_sizes=[1], reps=7
    )
    args = parser.parse_args()
    common.check_common_flags(parser, args)
    common.check_choices(parser, "--modes", args.modes, ["infer", "train"])
    common.check_choices(parser, "--impls", args.impls, common.models.IMPLS)

    env = common.environment()
    common.print_environment(env)
    tables = []
    for form in args.forms:
        for dtype in args.dtype:
            for batch in args.batch_sizes:
                for mode in args.modes:
                    fns, compile_s = build(args, form, dtype, batch, mode)
                    load0 = os.getloadavg()
                    times = common.interleaved(
                        {f"{k[0]}/{k[1]}": f for k, f in fns.items()}, args.warmup, args.reps
                    )
                    rows = []
                    for (fw, placement), _ in fns.items():
                        ts = times[f"{fw}/{placement}"]
                        base = times.get(f"{fw}/none")
                        row = {"form": form, "dtype": dtype, "batch": batch, "mode": mode}
                        row |= {"framework": fw, "placement": placement}
                        row |= {"ms_median": common.median_ms(ts), "ms_min": common.min_ms(ts)}
                        row["ms_all"] = [round(t * 1e3, 1) for t in ts]
                        row["compile_s"] = compile_s.get((fw, placement))
                        if base:
                            paired = common.paired_overhead(ts, base)
                            row["overhead_paired_pct"], *ci = paired
                            row["overhead_paired_ci90_pct"] = ci
                            row["overhead_median_pct"] = 100 * (
                                row["ms_median"] / common.median_ms(base) - 1
                            )
                            row["overhead_min_pct"] = 100 * (
                                row["ms_min"] / common.min_ms(base) - 1
                            )
                        row["loadavg_before_after"] = (load0, os.getloadavg())
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        if args.json:
                            with open(args.json, "a") as f:
                                f.write(json.dumps({"table": "overhead", **row, "env": env}) + "\n")
                    tables.append(((form, dtype, batch, mode), rows))
                    del fns
                    gc.collect()

    for (form, dtype, batch, mode), rows in tables:
        print(f"\n### {form} {dtype} batch {batch}, {mode}\n")
        frameworks = list(dict.fromkeys(r["framework"] for r in rows))
        head = "| placement |" + "".join(
            f" {fw} ms median (min) | {fw} overhead, paired median [90 % CI] (of minima) |"
            for fw in frameworks
        )
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for placement in args.placements:
            line = f"| {placement} |"
            for fw in frameworks:
                r = next(r for r in rows if r["framework"] == fw and r["placement"] == placement)
                line += f" {r['ms_median']:.0f} ({r['ms_min']:.0f}) |"
                if placement == "none" or "overhead_median_pct" not in r:
                    line += " – |"
                else:
                    paired = (r["overhead_paired_pct"], *r["overhead_paired_ci90_pct"])
                    line += f" {common.fmt_overhead(*paired)}"
                    line += f" ({r['overhead_min_pct']:+.1f} %) |"
            print(line)
    print(f"\nloadavg at end: {tuple(round(v, 2) for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
