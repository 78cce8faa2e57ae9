"""FLOPs and parameters of the networks, from XLA's cost analysis of the compiled forward.

    python bench/flops.py                     # C2D, TSM, I3D × none, CinST, STinC; 1 × 8×224²
    python bench/flops.py --impls fused,xla   # also the plain ('xla') attention's HLO

FLOPs are `jax.jit(f).lower(...).compile().cost_analysis()['flops']` of the inference forward
(`train=False`): XLA's count for the compiled HLO, in which a multiply-add is 2 FLOPs and every
elementwise op, comparison and reduction step counts as well. GMACs ≈ GFLOPs / 2, for papers
that report MACs. The attention's overhead is also derived analytically (`analytic_attention`)
to show where it comes from: the gate convolutions are tiny in parameters, but each slides over
a pooled map of size N/axis, and the poolings and the gate products touch the whole map N.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import common
import jax
import numpy as np

# ResNet-50's bottleneck stages: (blocks, planes).
STAGES_50 = ((3, 64), (4, 128), (6, 256), (3, 512))


def stage_sizes(size: int) -> list[int]:
    """Spatial size of each stage's conv2 output for `size`² input (56, 28, 14, 7 at 224²).

    The stem conv and max-pool halve it (rounding up), and stages 2–4 each halve it again.
    """
    first = math.ceil(math.ceil(size / 2) / 2)
    return [math.ceil(first / 2**stage) for stage in range(len(STAGES_50))]


GATE_AXES = {"C": "c", "T": "t", "H": "h", "W": "w"}


def unit_flops(unit: str, dims: dict[str, int]) -> dict[str, float]:
    """FLOPs of one attention unit on a `[b, t, h, w, c]` map, counted as XLA does.

    Pooling over an axis: one comparison and one addition per element (max and mean). Gate
    convolution: 2 × 54 per pooled position. Gate products: one multiplication per element for
    a C gating, and (two additions, a scaling, a multiplication) for the averaged T, H, W gates.
    The batch norm and sigmoid of a gate act on the pooled map and are counted with its conv.
    """
    n = float(np.prod(list(dims.values())))
    gates = {"C": ["C"], "ST": ["T", "H", "W"], "CinST": ["C", "T", "H", "W"]}
    gates["STinC"] = gates["CinST"]
    pooled = {g: n / dims[GATE_AXES[g]] for g in gates[unit]}
    conv = sum(2 * 54 * p + 5 * p for p in pooled.values())
    pool = 2 * n * len(pooled)
    product = {"C": n, "ST": 4 * n, "CinST": 5 * n, "STinC": 5 * n}[unit]
    return {"conv": conv, "pool": pool, "product": product, "convs_only_macs": conv / 2}


def analytic_attention(placement: str, batch: int, frames: int, size: int) -> dict[str, float]:
    """Attention FLOPs of ResNet-50 (every block carries the placement), summed over blocks."""
    from aia_jax.models.attention import PLACEMENTS

    units, combine = PLACEMENTS[placement]
    total = {"conv": 0.0, "pool": 0.0, "product": 0.0, "convs_only_macs": 0.0}
    for (blocks, planes), side in zip(STAGES_50, stage_sizes(size), strict=True):
        dims = {"b": batch, "t": frames, "h": side, "w": side, "c": planes}
        for unit in units:
            for k, v in unit_flops(unit, dims).items():
                total[k] += blocks * v
        if combine == "sum":  # 0.5·a + 0.5·b
            total["product"] += blocks * 3 * float(np.prod(list(dims.values())))
    total["all"] = total["conv"] + total["pool"] + total["product"]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_flags(parser, impl=False, timing=False)
    parser.add_argument("--impls", type=common.csv, default=["fused"], help="fused,xla")
    parser.set_defaults(batch_sizes=[1], dtype=["float32"])
    args = parser.parse_args()
    common.check_common_flags(parser, args)
    common.check_choices(parser, "--impls", args.impls, common.models.IMPLS)

    env = common.environment()
    common.print_environment(env)
    rows = []
    for form in args.forms:
        for batch in args.batch_sizes:
            base_flops, base_params = {}, None  # the plain backbone's, per dtype
            for placement in args.placements:
                name = common.model_name(form, placement)
                for dtype in args.dtype:
                    model = common.jax_model(name, dtype, args.frames)
                    clips = common.jax_clips(batch, args.frames, args.size)
                    shapes = jax.eval_shape(
                        lambda m=model, x=clips: m.init(jax.random.key(0), x, train=False)
                    )
                    params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))
                    row = {"form": form, "placement": placement, "dtype": dtype, "batch": batch}
                    row["params"] = params
                    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
                    for impl in args.impls:
                        net = common.jax_model(name, dtype, args.frames, impl)
                        compiled, secs = common.compile_timed(
                            common.inference_fn(net), variables, clips
                        )
                        row[f"gflops_{impl}"] = common.cost(compiled)["flops"] / 1e9
                        row[f"compile_s_{impl}"] = secs
                    if placement == "none":
                        base_flops[dtype] = {i: row[f"gflops_{i}"] for i in args.impls}
                        base_params = params
                    else:
                        ana = analytic_attention(placement, batch, args.frames, args.size)
                        row["analytic_gflops"] = ana["all"] / 1e9
                        row["analytic_conv_gmacs"] = ana["convs_only_macs"] / 1e9
                    if dtype in base_flops and base_params:
                        row["flops_overhead_pct"] = {
                            impl: 100 * (row[f"gflops_{impl}"] / base_flops[dtype][impl] - 1)
                            for impl in args.impls
                        }
                        row["params_overhead_pct"] = 100 * (params / base_params - 1)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.json:
                        with open(args.json, "a") as f:
                            f.write(json.dumps({"table": "flops", **row, "env": env}) + "\n")

    impl0 = args.impls[0]
    print()
    head = "| net | batch | params | Δparams | GFLOPs (XLA) | GMACs ≈ | ΔFLOPs (XLA) |"
    head += " ΔFLOPs analytic | of which gate convs |"
    extra = [i for i in args.impls if i != impl0]
    head += "".join(f" GFLOPs ({i}) |" for i in extra)
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        name = common.model_name(r["form"], r["placement"])
        if len(args.dtype) > 1:
            name += f" ({r['dtype']})"
        # Overheads need the plain backbone ('none') in --placements: "–" without it.
        compared = r["placement"] != "none" and "flops_overhead_pct" in r
        over = r["flops_overhead_pct"][impl0] if compared else 0.0
        line = f"| {name} | {r['batch']} | {r['params']:,} |"
        line += f" {r['params_overhead_pct']:+.3f} % |" if compared else " – |"
        line += f" {r[f'gflops_{impl0}']:.2f} | {r[f'gflops_{impl0}'] / 2:.2f} |"
        line += f" {over:+.2f} % |" if compared else " – |"
        if "analytic_gflops" in r and "flops_overhead_pct" in r:
            base = r[f"gflops_{impl0}"] / (1 + over / 100)
            line += f" {100 * r['analytic_gflops'] / base:+.2f} % |"
            line += f" {100 * 2 * r['analytic_conv_gmacs'] / base:+.2f} % |"
        else:
            line += " – | – |"
        line += "".join(f" {r[f'gflops_{i}']:.2f} |" for i in extra)
        print(line)
    print(f"\nloadavg at end: {tuple(round(v, 2) for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
