"""Training-step and inference throughput of the JAX networks beside the PyTorch reference.

    python bench/step.py                                  # CPU: batch 1,2; f32 and bf16
    python bench/step.py --batch-sizes 8,16,32 --reps 20  # GPU (see bench/RESULTS.md)

For each form × placement × dtype × batch (ResNet-50, 8 × 224², 174 classes):

- JAX inference: `jit(model.apply(train=False))`; JAX training: forward + backward + SGD
  (momentum 0.9, weight decay 1e-4) in one `jit` with the state donated.
- PyTorch (tests/torch_reference.py, as the release runs it): eager `model(x)` under
  `torch.no_grad()` for inference; `loss.backward(); opt.step()` for training; bf16 through
  `torch.autocast('cpu', dtype=torch.bfloat16)`. There is no PyTorch I3D in the release.

JAX and PyTorch of one configuration are timed round-robin in the same process (warm-up, then
`--reps` alternating repetitions), so a change of machine load hits both; the tables give the
median and the minimum. Peak memory: JAX from the compiled executable's `memory_analysis()`
(arguments + outputs + temporaries − donated aliases); PyTorch as the growth of the C heap in
use (glibc `mallinfo2`) during one step, sampled every millisecond: what the step allocates on
top of the live model and optimiser state (its CPU allocator keeps no peak counter). MFU
is XLA's FLOP count of the step over its time, divided by the peak `common.assumed_peak` states;
the PyTorch column uses the same FLOP count (same network).
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
    torch_ok = not args.no_torch and form in common.TORCH_FORMS
    if torch_ok:
        import torch

        tmodel = common.torch_model(name, args.frames)
        tclips = common.torch_clips(batch, args.frames, args.size)
        if mode == "infer":
            fns["torch"] = common.torch_inference(tmodel, tclips, dtype)
        else:
            tlabels = torch.arange(batch) % common.NUM_CLASSES
            fns["torch"] = common.torch_train_step(tmodel, tclips, tlabels, dtype)
    times = common.interleaved(fns, args.warmup, args.reps)
    for k, ts in times.items():
        row[f"{k}_ms_median"] = common.median_ms(ts)
        row[f"{k}_ms_min"] = common.min_ms(ts)
        row[f"{k}_ms_all"] = [round(t * 1e3, 1) for t in ts]
    if torch_ok:
        with common.heap_peak() as mem:
            fns["torch"]()
        row["torch_heap_growth_bytes"] = mem["peak"] - mem["base"]
        del fns, tmodel
    gc.collect()
    return row


def fmt_rows(rows: list[dict], mode: str, peak: float) -> str:
    head = (
        "| net | dtype | batch | JAX ms median (min) | clips/s | compile s | XLA peak (temp) MiB |"
        " GFLOP/s | MFU % | PT ms median (min) | PT clips/s | PT heap+ MiB | JAX/PT time |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["mode"] != mode:
            continue
        name = common.model_name(r["form"], r["placement"])
        med, mn = r["jax_ms_median"], r["jax_ms_min"]
        gflops = r["flops"] / (med / 1e3) / 1e9
        line = f"| {name} | {r['dtype']} | {r['batch']} | {med:.0f} ({mn:.0f}) |"
        line += f" {r['batch'] / (med / 1e3):.2f} | {r['compile_s']:.1f} |"
        line += f" {r.get('peak_bytes', float('nan')) / 2**20:.0f}"
        line += f" ({r.get('temp_bytes', float('nan')) / 2**20:.0f}) | {gflops:.0f} |"
        line += f" {100 * gflops * 1e9 / peak:.1f} |"
        if "torch_ms_median" in r:
            tmed, tmn = r["torch_ms_median"], r["torch_ms_min"]
            line += f" {tmed:.0f} ({tmn:.0f}) | {r['batch'] / (tmed / 1e3):.2f} |"
            line += f" {r['torch_heap_growth_bytes'] / 2**20:.0f} | {med / tmed:.2f} |"
        else:
            line += " – | – | – | – |"
        out.append(line)
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_flags(parser)
    parser.add_argument("--modes", type=common.csv, default=["infer", "train"])
    args = parser.parse_args()

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
