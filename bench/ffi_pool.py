"""A unit's T, H and W pools in one read of the map: hand-written C++ kernels against XLA's.

    python bench/ffi_pool.py               # ResNet-50's four stage maps, batch 1, 30 rounds
    python bench/ffi_pool.py --reps 60

What a `jax.ffi` CPU kernel would buy. CinST pools its inner map `y = x · gate_C` over t, h
and w; `fused.pool` reads the map once per axis (three variadic reductions, the product fused
into each), and in training first writes `y` (the backward pass compares it with the maxima)
and counts the maxima's ties. `bench/ffi_pool.cc` does either in one read: every element of `x`
updates the max, sum (and tie count) of all three axes, 16 channels at a time; a third kernel
does the same for the ST gates' product's gradient. Each runs on one thread and, in a second
column, in two halves, the second on XLA's intra-op thread pool. They are compiled here with
the host's C++ compiler (`$CXX`, else `c++`; `-O3 -march=native`) against jaxlib's FFI
headers, registered with `jax.ffi.register_ffi_target` and called with `jax.ffi.ffi_call`;
their results are checked against `fused` (maxima, tie counts and the written map equal, sums
to float32 rounding, on maps with ties) before anything is timed.

Columns, per stage map `[1, 8, s, s, c]` (the shapes after a bottleneck's `conv2`, as in
`bench/unit.py`): one pass `y = x · g` written by XLA (the scale: one read, one write); the
inference pools, `fused._pool_values(y)`; the training pools, `fused._pool_fwd(y)` (`y`
written, ties counted; the kernel writes `y` too); the ST gates' product `x · (gT + gH + gW)/3`
differentiated, by `fused.gate_product`'s gradient (`dx` in one pass, then `Σ_axis dout·x` per
gate) and by the kernel (all four in one read of `x` and `dout`). "net" sums over the 3 + 4 +
6 + 3 blocks of a ResNet-50. Every program is compiled first, then all are timed round-robin;
ms are medians.

On the 2-core Intel host of bench/RESULTS.md §4 (session 45) the kernels took 0.4–0.7× XLA's
time alone, yet called from the training step they made it 1.0–1.6 % slower, which is why the
library does not use them.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import common
import jax
import jax.numpy as jnp
import numpy as np

from aia_jax.models import fused

SOURCE = Path(__file__).with_name("ffi_pool.cc")
STAGES = [(56, 64, 3), (28, 128, 4), (14, 256, 6), (7, 512, 3)]
AXES = (1, 2, 3)
TARGETS = {
    "AiaPoolThw": "aia_pool_thw",
    "AiaPoolThwTies": "aia_pool_thw_ties",
    "AiaProductThwGrad": "aia_product_thw_grad",
}
WEIGHTS = (1 / 3,) * 3  # the ST gates' average


def compiler() -> str | None:
    """The C++ compiler to use: `$CXX`, else `c++` or `g++` on the path; None if there is none."""
    name = os.environ.get("CXX")
    if name:
        return shutil.which(name)
    return shutil.which("c++") or shutil.which("g++")


def build(cxx: str) -> Path:
    """Compiles `ffi_pool.cc` into a temporary shared library (removed at exit); its path.

    Raises:
      RuntimeError: the compiler failed (its last message line in the error).
    """
    lib = common.scratch_dir("aia_jax_ffi_pool_") / "libffi_pool.so"
    cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
    cmd += [f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"{Path(cxx).name} failed on {SOURCE.name}: {lines[-1]}")
    return lib


def register(lib: Path) -> None:
    """Registers the library's handlers as CPU FFI targets (`TARGETS`)."""
    handle = ctypes.cdll.LoadLibrary(str(lib))
    for symbol, target in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)), "cpu")


@functools.cache
def load(cxx: str) -> Path:
    """Builds and registers the kernels, once per process (XLA refuses a second registration)."""
    lib = build(cxx)
    register(lib)
    return lib


def _reduced(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return shape[:axis] + shape[axis + 1 :]


def kernel_pools(
    x: jax.Array, g: jax.Array, split: bool = False
) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """`((max, mean), …)` of `x · g[..., None]` over t, h and w: the kernel, one read."""
    outs = [jax.ShapeDtypeStruct(_reduced(x.shape, a), jnp.float32) for a in AXES for _ in (0, 1)]
    flat = jax.ffi.ffi_call(TARGETS["AiaPoolThw"], outs)(x, g, split=split)
    return tuple((flat[2 * i], flat[2 * i + 1] / x.shape[a]) for i, a in enumerate(AXES))


def kernel_pools_ties(x: jax.Array, g: jax.Array, split: bool = False):
    """The training forward by the kernel: `y = x · g` written, and per axis (max, ties, mean)."""
    outs = [jax.ShapeDtypeStruct(x.shape, jnp.float32)]
    outs += [jax.ShapeDtypeStruct(_reduced(x.shape, a), jnp.float32) for a in AXES for _ in "mns"]
    y, *flat = jax.ffi.ffi_call(TARGETS["AiaPoolThwTies"], outs)(x, g, split=split)
    stats = tuple(
        (flat[3 * i], flat[3 * i + 1], flat[3 * i + 2] / x.shape[a]) for i, a in enumerate(AXES)
    )
    return y, stats


def gated(x: jax.Array, g: jax.Array) -> jax.Array:
    """`x · g`, the gate broadcast over channels: the map CinST pools."""
    return x * g[..., None]


def xla_pools(x: jax.Array, g: jax.Array):
    """The same pools by `fused` (inference): one variadic reduction per axis."""
    return fused._pool_values(gated(x, g), AXES)


def xla_pools_ties(x: jax.Array, g: jax.Array, anchor: jax.Array):
    """The training forward by `fused`: the map written, per axis (max, ties, mean)."""
    out, (y, stats, _) = fused._pool_fwd(gated(x, g), AXES, anchor)
    return y, tuple((m, ties, mean) for (m, ties), (_, mean) in zip(stats, out, strict=True))


def kernel_product_grad(x, dout, gates, split: bool = False):
    """The gating product's gradient by the kernel: `dx` and each gate's, one read of x and dout."""
    outs = [jax.ShapeDtypeStruct(x.shape, jnp.float32)]
    outs += [jax.ShapeDtypeStruct(g.shape, jnp.float32) for g in gates]
    dx, *dgates = jax.ffi.ffi_call(TARGETS["AiaProductThwGrad"], outs)(
        x, dout, *gates, weight=np.float32(WEIGHTS[0]), split=split
    )
    return dx, tuple(dgates)


def xla_product_grad(x, dout, gates):
    """The same gradient by `fused.gate_product`'s hand-written one."""
    return fused._gate_product_bwd(AXES, WEIGHTS, (x, gates), dout)


def check(shape: tuple[int, ...], seed: int = 0) -> None:
    """Raises AssertionError unless the kernels, on one thread and in two halves, equal `fused`
    on a `shape` map with ties."""
    kx, kg = jax.random.split(jax.random.key(seed))
    # Values on a coarse grid, and a gate of 1 or 0.5, so that maxima tie often.
    x = jnp.round(jax.random.normal(kx, shape) * 2) / 2
    g = jnp.where(jax.random.bernoulli(kg, 0.5, shape[:-1]), 1.0, 0.5)
    anchor = jnp.ones((27, 2), jnp.float32)
    dout = jax.random.normal(jax.random.key(seed + 1), shape)
    gates = _gates(shape, seed + 2)
    pools = xla_pools(x, g)
    xy, xstats = jax.jit(xla_pools_ties)(x, g, anchor)
    xdx, xdg = jax.jit(xla_product_grad)(x, dout, gates)
    for split in (False, True):
        kernels = kernel_pools(x, g, split)
        for (km, kmean), (xm, xmean) in zip(kernels, pools, strict=True):
            np.testing.assert_array_equal(km, xm)
            np.testing.assert_allclose(kmean, xmean, rtol=1e-6, atol=1e-6)
        ky, kstats = kernel_pools_ties(x, g, split)
        np.testing.assert_array_equal(ky, xy)
        for (km, kn, kmean), (xm, xn, xmean) in zip(kstats, xstats, strict=True):
            np.testing.assert_array_equal(km, xm)
            np.testing.assert_array_equal(kn, xn)
            np.testing.assert_allclose(kmean, xmean, rtol=1e-6, atol=1e-6)
        kdx, kdg = kernel_product_grad(x, dout, gates, split)
        np.testing.assert_allclose(kdx, xdx, rtol=1e-6, atol=1e-6)
        for kd, xd in zip(kdg, xdg, strict=True):
            np.testing.assert_allclose(kd, xd, rtol=1e-5, atol=1e-5)


def _gates(shape: tuple[int, ...], seed: int) -> tuple[jax.Array, ...]:
    """A T, H and W gate in (0, 1) for a `shape` map."""
    keys = jax.random.split(jax.random.key(seed), len(AXES))
    return tuple(
        jax.nn.sigmoid(jax.random.normal(k, _reduced(shape, a))) for k, a in zip(keys, AXES)
    )


def _compiled(fn: Callable, *args) -> Callable[[], None]:
    run = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(run(*args))
    return lambda: jax.block_until_ready(run(*args))


# Per operation: XLA's program, the kernel on one thread, the kernel in two halves.
OPS = {"infer": "inference pools", "train": "training pools", "bwd": "product gradient"}
VARIANTS = ("xla", "ffi", "ffi2")
COLUMNS = ("pass", *(f"{op}_{v}" for op in OPS for v in VARIANTS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=30, help="timed rounds (median)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    args = parser.parse_args()
    common.check_at_least(parser, args, 1, "reps", "batch", "frames")
    cxx = compiler()
    if cxx is None:
        parser.error("no C++ compiler: set CXX or put c++ on the PATH")
    if jax.default_backend() != "cpu":
        parser.error(f"a CPU kernel: run with JAX_PLATFORMS=cpu (backend: {jax.default_backend()})")
    try:
        load(cxx)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    common.print_environment({**common.environment(), "cxx": cxx})

    # A tail of channels (not a multiple of the 16 lanes) and a batch of 2, then every stage.
    check((2, 3, 5, 6, 19))
    runs = {}
    for size, channels, _ in STAGES:
        shape = (args.batch, args.frames, size, size, channels)
        check(shape)
        x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
        g = jax.nn.sigmoid(jax.random.normal(jax.random.key(1), shape[:-1], jnp.float32))
        anchor = jnp.ones((27, 2), jnp.float32)
        dout = jax.random.normal(jax.random.key(2), shape, jnp.float32)
        gates = _gates(shape, 3)
        runs[size] = {
            "pass": _compiled(gated, x, g),
            "infer_xla": _compiled(xla_pools, x, g),
            "infer_ffi": _compiled(kernel_pools, x, g),
            "infer_ffi2": _compiled(functools.partial(kernel_pools, split=True), x, g),
            "train_xla": _compiled(xla_pools_ties, x, g, anchor),
            "train_ffi": _compiled(kernel_pools_ties, x, g),
            "train_ffi2": _compiled(functools.partial(kernel_pools_ties, split=True), x, g),
            "bwd_xla": _compiled(xla_product_grad, x, dout, gates),
            "bwd_ffi": _compiled(kernel_product_grad, x, dout, gates),
            "bwd_ffi2": _compiled(
                functools.partial(kernel_product_grad, split=True), x, dout, gates
            ),
        }
    print(
        "kernels equal fused's (pools: maxima, tie counts and the written map exactly; "
        "sums and gradients to float32 rounding)\n"
    )

    times = {(size, col): [] for size in runs for col in COLUMNS}
    for _ in range(args.reps):
        for size, run in runs.items():
            for col in COLUMNS:
                start = time.perf_counter()
                run[col]()
                times[(size, col)].append(time.perf_counter() - start)

    print(
        f"ms, median of {args.reps} (batch {args.batch}, {args.frames} frames, float32); "
        "in brackets: over XLA's\n"
    )
    header = ["map", "one pass y = x·g (XLA)"]
    for name in OPS.values():
        header += [f"{name}: XLA", f"{name}: kernel", f"{name}: kernel, two halves"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows, net = [], dict.fromkeys(COLUMNS, 0.0)
    for size, channels, blocks in STAGES:
        ms = {col: common.median_ms(times[(size, col)]) for col in COLUMNS}
        rows.append((f"{size}²×{channels}", ms))
        for col in COLUMNS:
            net[col] += blocks * ms[col]
    for label, ms in [*rows, ("net (16 blocks)", net)]:
        cells = [f"{ms['pass']:.3f}"]
        for op in OPS:
            xla = ms[f"{op}_xla"]
            cells.append(f"{xla:.3f}")
            cells += [f"{ms[f'{op}_{v}']:.3f} ({ms[f'{op}_{v}'] / xla:.2f})" for v in VARIANTS[1:]]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
