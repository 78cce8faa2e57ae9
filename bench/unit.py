"""One attention unit on its own: time per ResNet-50 stage, summed over the network's blocks.

    python bench/unit.py                              # C, ST, CinST, STinC; fused; batch 1
    python bench/unit.py --units CinST --impls fused,xla --reps 9
    python bench/unit.py --units CinST --baseline /tmp/old   # fused vs an older checkout's

Each unit runs on a map of one ResNet-50 stage (`[b, 8, 56, 56, 64]` … `[b, 8, 7, 7, 512]`,
the shapes after `conv2`), as inference and as a gradient of a fixed linear function of its
output (parameters and input: what a training step needs). All programs are compiled first,
then timed round-robin. "net" is the sum over the 3 + 4 + 6 + 3 blocks of a ResNet-50, i.e. the
unit's cost in one network pass if nothing else ran alongside. "kernels" counts the compiled
program's top-level operations (fusions, reductions, custom calls). Cutting a unit's kernels by
a fifth did not change its time measurably (bench/RESULTS.md §3, 2026-12-04): the count says how
the program is cut up, not what it costs.

`--baseline DIR` adds the rows `fused@baseline`: the same units built from another checkout's
`aia_jax.models` (e.g. a `git worktree` of an older commit; `common.baseline_models`), timed in
the same round-robin, so that an A/B of a change to them is not at the mercy of the load
between two runs.
"""

from __future__ import annotations

import argparse
import re
import time

import common
import jax
import jax.numpy as jnp
import numpy as np

from aia_jax.models import attention

# (h = w, channels, blocks) of ResNet-50's four stages at 224² input.
STAGES = [(56, 64, 3), (28, 128, 4), (14, 256, 6), (7, 512, 3)]

_NOT_KERNELS = ("parameter", "constant", "bitcast", "tuple", "get-tuple-element", "copy-start")


# An instruction line: its name, its (possibly tuple) shape and its opcode.
# (Newer XLA versions print names without the `%`.)
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?(\S+) = (\(.*?\)|\S+) ([\w\-]+)\(")


def entry_instructions(compiled) -> list[tuple[str, str, str, str]]:
    """`(name, shape, opcode, line)` of each instruction of the compiled entry computation."""
    text = compiled.as_text()
    lines = text[text.index("ENTRY") :].splitlines()[1:]
    return [(*m.groups(), line) for line in lines if (m := _INSTRUCTION.match(line))]


def kernel_count(compiled) -> int:
    """Top-level operations of the compiled entry computation that do work."""
    return sum(op not in _NOT_KERNELS for _, _, op, _ in entry_instructions(compiled))


def build(unit: str, impl: str, shape: tuple[int, ...], dtype, models=attention) -> dict:
    x = jax.random.normal(jax.random.key(0), shape, dtype)
    probe = jax.random.normal(jax.random.key(2), shape, jnp.float32)
    module = models.AttentionUnit(unit, dtype=dtype, impl=impl)
    variables = module.init(jax.random.key(1), x, train=True)
    stats = variables["batch_stats"]

    def loss(params, x):
        out, _ = module.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(out.astype(jnp.float32) * probe)

    def infer(params, x):
        return module.apply({"params": params, "batch_stats": stats}, x, train=False)

    args = (variables["params"], x)
    train = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    inference = jax.jit(infer).lower(*args).compile()
    jax.block_until_ready(train(*args))
    jax.block_until_ready(inference(*args))
    return {
        "train": lambda: jax.block_until_ready(train(*args)),
        "infer": lambda: jax.block_until_ready(inference(*args)),
        "kernels": (kernel_count(train), kernel_count(inference)),
        "compiled": {"train": train, "infer": inference},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--units", type=common.csv, default=["C", "ST", "CinST", "STinC"], help="C,ST,CinST,STinC"
    )
    parser.add_argument("--impls", type=common.csv, default=["fused"], help="fused,xla")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=list(common.DTYPES))
    parser.add_argument("--reps", type=int, default=15, help="timed rounds (median)")
    parser.add_argument(
        "--baseline", help="checkout whose aia_jax.models to time alongside (a git worktree)"
    )
    args = parser.parse_args()
    common.check_choices(parser, "--units", args.units, list(attention.UNIT_GATES))
    common.check_choices(parser, "--impls", args.impls, attention.IMPLS)
    common.check_at_least(parser, args, 1, "batch", "frames", "reps")
    variants = [(impl, impl, attention) for impl in args.impls]
    if args.baseline:
        try:
            variants.append(("fused@baseline", "fused", common.baseline_models(args.baseline)))
        except FileNotFoundError as e:
            parser.error(f"--baseline: {e}")
    common.print_environment(common.environment())
    dtype = common.DTYPES[args.dtype]
    runs = {}
    for unit in args.units:
        for label, impl, models in variants:
            for size, channels, _ in STAGES:
                shape = (args.batch, args.frames, size, size, channels)
                runs[(unit, label, size)] = build(unit, impl, shape, dtype, models)
            print(f"compiled {unit} ({label})", flush=True)

    times = {(key, mode): [] for key in runs for mode in ("train", "infer")}
    done = 0
    try:
        for _ in range(args.reps):
            for key, run in runs.items():
                for mode in ("train", "infer"):
                    start = time.perf_counter()
                    run[mode]()
                    times[(key, mode)].append(time.perf_counter() - start)
            done += 1
    except KeyboardInterrupt:
        # A time limit (bench/gpu_session.sh sends SIGINT) keeps the rounds already timed.
        if not done:
            raise
        print(f"\ninterrupted: the table has the {done} complete rounds of {args.reps}")
        times = {k: v[:done] for k, v in times.items()}

    print(
        f"\nms per unit, median of {done} (batch {args.batch}, {args.frames} frames, "
        f"{args.dtype}); train = gradient w.r.t. parameters and input\n"
    )
    stage_cols = " | ".join(f"{s}²×{c} train / infer" for s, c, _ in STAGES)
    print(f"| unit | impl | {stage_cols} | net train / infer | kernels train / infer (56²) |")
    print("|---|---|" + "---|" * (len(STAGES) + 2))
    for unit in args.units:
        for impl, _, _ in variants:
            cells, net = [], {"train": 0.0, "infer": 0.0}
            for size, _, blocks in STAGES:
                ms = {m: 1e3 * float(np.median(times[((unit, impl, size), m)])) for m in net}
                cells.append(f"{ms['train']:.2f} / {ms['infer']:.2f}")
                for m in net:
                    net[m] += blocks * ms[m]
            k_train, k_infer = runs[(unit, impl, STAGES[0][0])]["kernels"]
            print(
                f"| {unit} | {impl} | " + " | ".join(cells) + f" | {net['train']:.1f} / "
                f"{net['infer']:.1f} | {k_train} / {k_infer} |"
            )


if __name__ == "__main__":
    main()
