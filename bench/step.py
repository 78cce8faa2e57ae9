"""Training-step and inference throughput of the JAX networks beside the PyTorch reference.

    python bench/step.py                                  # CPU: batch 1,2; f32 and bf16
    python bench/step.py --batch-sizes 8,16,32 --reps 20  # GPU (see bench/RESULTS.md)

For each form × placement × dtype × batch (ResNet-50, 8 × 224², 174 classes):

- JAX inference: `jit(model.apply(train=False))`; JAX training: forward + backward + SGD
  (momentum 0.9, weight decay 1e-4) in one `jit` with the state donated.
- PyTorch (tests/torch_reference.py, as the release runs it): eager `model(x)` under
  `torch.no_grad()` for inference; `loss.backward(); opt.step()` for training; bf16 through
  `torch.autocast(device, dtype=torch.bfloat16)`. It runs on the device JAX runs on (CUDA when
  JAX is on a GPU, `common.torch_device`). By default it is timed in the JAX row's dtype;
  `--torch-dtypes float32,bfloat16` times it in each (the release trains in float32, so a bf16
  JAX step is compared with both). There is no PyTorch I3D in the release.

JAX and PyTorch of one configuration are timed round-robin in the same process (warm-up, then
`--reps` alternating repetitions), so a change of machine load hits both; the tables give the
median and the minimum. Peak memory: JAX from the compiled executable's `memory_analysis()`
(arguments + outputs + temporaries − donated aliases); PyTorch as what one step allocates on
top of the live model and optimiser state (`common.torch_memory_growth`: the CUDA allocator's
peak, or on CPU the C heap sampled every millisecond, as its CPU allocator keeps no peak), for
the first `--torch-dtypes`. GFLOP/s is XLA's FLOP count of the JAX step (`cost_analysis`) over
its median time, and MFU % that over the peak `common.assumed_peak` prints (`--peak-tflops`
overrides it); the PyTorch columns give time, clips/s and the JAX/PyTorch time ratio, no MFU.

`--remat` adds the same network with `remat=True` (each backbone block recomputed in the
backward pass) to every training row, timed in the same round-robin: its time, its time over
the plain step's and its compiled peak memory.

`--baseline DIR` adds the same network built from another checkout's `aia_jax.models` (e.g. a
`git worktree` of an older commit; `common.baseline_models`) to every row, timed in the same
round-robin: its time and this checkout's overhead over it, paired round by round
(`common.paired_overhead`), so that an A/B of a change to the models is not at the mercy of
the load between two runs. The training step around it is this checkout's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os

import common
import jax.numpy as jnp


def run_config(args, form: str, placement: str, dtype: str, batch: int, mode: str) -> dict:
    """Times one configuration in one mode ('infer' or 'train'), JAX and PyTorch round-robin."""
    name = common.model_name(form, placement)
    clips = common.jax_clips(batch, args.frames, args.size)
    labels = jnp.arange(batch, dtype=jnp.int32) % common.NUM_CLASSES
    model = common.jax_model(name, dtype, args.frames, args.impl)
    variables = common.jax_variables(model, clips)
    row: dict = {"form": form, "placement": placement, "dtype": dtype, "batch": batch}
    row["mode"] = mode
    jax_fn, compiled, secs = common.compiled_runner(model, variables, clips, labels, mode)
    row["compile_s"] = secs
    row.update(common.cost(compiled))
    fns = {"jax": jax_fn}
    if args.remat and mode == "train":
        remat_model = common.jax_model(name, dtype, args.frames, args.impl, remat=True)
        fns["remat"], remat_compiled, row["remat_compile_s"] = common.compiled_runner(
            remat_model, variables, clips, labels, mode
        )
        row.update({f"remat_{k}": v for k, v in common.cost(remat_compiled).items()})
    if args.baseline_models is not None:
        base = common.jax_model(name, dtype, args.frames, args.impl, package=args.baseline_models)
        fns["baseline"], _, row["baseline_compile_s"] = common.compiled_runner(
            base, common.jax_variables(base, clips), clips, labels, mode
        )
    with_torch = form in common.TORCH_FORMS and not args.no_torch
    torch_dtypes = (args.torch_dtypes or [dtype]) if with_torch else []
    if torch_dtypes:
        tmodel = common.torch_model(name, args.frames)
        tclips = common.torch_clips(batch, args.frames, args.size)
        tlabels = common.torch_labels(batch)
        for tdtype in torch_dtypes:
            if mode == "infer":
                fns[f"torch-{tdtype}"] = common.torch_inference(tmodel, tclips, tdtype)
            else:
                fns[f"torch-{tdtype}"] = common.torch_train_step(tmodel, tclips, tlabels, tdtype)
    times = common.interleaved(fns, args.warmup, args.reps)
    for k, ts in times.items():
        row[f"{k}_ms_median"] = common.median_ms(ts)
        row[f"{k}_ms_min"] = common.min_ms(ts)
        row[f"{k}_ms_all"] = [round(t * 1e3, 1) for t in ts]
    row["torch_dtypes"] = torch_dtypes
    if torch_dtypes:
        row["torch_mem_growth_bytes"] = common.torch_memory_growth(fns[f"torch-{torch_dtypes[0]}"])
        del fns, tmodel
    gc.collect()
    return row


def fmt_rows(rows: list[dict], mode: str, peak: float) -> str:
    """One markdown table of `mode`: JAX's figures, then each PyTorch dtype's beside them."""
    rows = [r for r in rows if r["mode"] == mode]
    torch_dtypes = list(dict.fromkeys(d for r in rows for d in r["torch_dtypes"]))
    head = (
        "| net | dtype | batch | JAX ms median (min) | clips/s | compile s | XLA peak (temp) MiB |"
        " GFLOP/s | MFU % |"
    )
    for d in torch_dtypes:
        head += f" PT {d} ms median (min) | PT {d} clips/s | JAX/PT {d} time |"
    if torch_dtypes:
        head += f" PT {torch_dtypes[0]} mem+ MiB |"
    with_remat = any("remat_ms_median" in r for r in rows)
    if with_remat:
        head += " remat ms median (min) | remat / JAX time | remat XLA peak (temp) MiB |"
    with_baseline = any("baseline_ms_median" in r for r in rows)
    if with_baseline:
        head += " baseline ms median (min) | JAX over baseline, paired [90 % CI] |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        name = common.model_name(r["form"], r["placement"])
        med, mn = r["jax_ms_median"], r["jax_ms_min"]
        gflops = r["flops"] / (med / 1e3) / 1e9
        line = f"| {name} | {r['dtype']} | {r['batch']} | {med:.0f} ({mn:.0f}) |"
        line += f" {r['batch'] / (med / 1e3):.2f} | {r['compile_s']:.1f} |"
        line += f" {r.get('peak_bytes', float('nan')) / 2**20:.0f}"
        line += f" ({r.get('temp_bytes', float('nan')) / 2**20:.0f}) | {gflops:.0f} |"
        line += f" {100 * gflops * 1e9 / peak:.1f} |"
        for d in torch_dtypes:
            if f"torch-{d}_ms_median" in r:
                tmed, tmn = r[f"torch-{d}_ms_median"], r[f"torch-{d}_ms_min"]
                line += f" {tmed:.0f} ({tmn:.0f}) | {r['batch'] / (tmed / 1e3):.2f} |"
                line += f" {med / tmed:.2f} |"
            else:
                line += " – | – | – |"
        if torch_dtypes:
            growth = r.get("torch_mem_growth_bytes")
            line += f" {growth / 2**20:.0f} |" if growth is not None else " – |"
        if with_remat:
            rmed = r.get("remat_ms_median")
            if rmed is None:
                line += " – | – | – |"
            else:
                line += f" {rmed:.0f} ({r['remat_ms_min']:.0f}) | {rmed / med:.2f} |"
                line += f" {r.get('remat_peak_bytes', float('nan')) / 2**20:.0f}"
                line += f" ({r.get('remat_temp_bytes', float('nan')) / 2**20:.0f}) |"
        if with_baseline:
            bmed = r.get("baseline_ms_median")
            if bmed is None:
                line += " – | – |"
            else:
                paired = common.fmt_overhead(
                    *common.paired_overhead(r["jax_ms_all"], r["baseline_ms_all"])
                )
                line += f" {bmed:.0f} ({r['baseline_ms_min']:.0f}) | {paired} |"
        out.append(line)
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_flags(parser)
    parser.add_argument("--modes", type=common.csv, default=["infer", "train"])
    parser.add_argument(
        "--torch-dtypes",
        type=common.csv,
        default=None,
        help="PyTorch dtypes timed beside each JAX row, float32 (eager) and/or bfloat16 "
        "(autocast); default: the row's own dtype",
    )
    parser.add_argument(
        "--remat",
        action="store_true",
        help="also time each training row with remat=True (blocks recomputed in the backward "
        "pass), in the same round-robin",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="checkout whose aia_jax.models to time alongside each row (e.g. a git worktree)",
    )
    args = parser.parse_args()
    common.check_common_flags(parser, args)
    common.check_choices(parser, "--modes", args.modes, ["infer", "train"])
    if args.torch_dtypes is not None:
        common.check_choices(parser, "--torch-dtypes", args.torch_dtypes, list(common.DTYPES))
    try:
        args.baseline_models = common.baseline_models(args.baseline) if args.baseline else None
    except FileNotFoundError as e:
        parser.error(f"--baseline: {e}")

    env = common.environment()
    common.print_environment(env)
    peaks = {d: common.assumed_peak(d, args.peak_tflops) for d in args.dtype}
    for d, (_, how) in peaks.items():
        print(f"assumed peak ({d}): {how}")
    rows = []
    for form in args.forms:
        for placement in args.placements:
            for dtype in args.dtype:
                for batch in args.batch_sizes:
                    for mode in args.modes:
                        row = run_config(args, form, placement, dtype, batch, mode)
                        row["loadavg"] = os.getloadavg()
                        rows.append(row)
                        brief = {k: v for k, v in row.items() if not k.endswith("_all")}
                        print(json.dumps(brief), flush=True)
                        if args.json:
                            with open(args.json, "a") as f:
                                f.write(json.dumps({"table": "step", **row, "env": env}) + "\n")
    for mode in args.modes:
        print(f"\n### {mode}\n")
        for dtype in args.dtype:
            sub = [r for r in rows if r["dtype"] == dtype]
            print(fmt_rows(sub, mode, peaks[dtype][0]))
            print()
    print(f"loadavg at end: {tuple(round(v, 2) for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
