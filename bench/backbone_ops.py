"""The backbone's own ops on XLA: `aia_jax.models.layers` against Flax's `nn.Conv` / `nn.max_pool`.

    python bench/backbone_ops.py                     # per-op table + whole networks, CPU
    python bench/backbone_ops.py --no-ops --forms TSM --modes train
    python bench/backbone_ops.py --no-ops --no-networks --shift   # the temporal shift only

`layers.Conv` computes a 1×1 convolution as a matrix product over channels with a flat kernel
gradient, and `layers.max_pool` has a hand-written first-maximum gradient (the module's
docstring says why). This script measures both against what they replace, side by side in
one process and round-robin, and against PyTorch's own kernels (oneDNN on CPU):

1. per op, at ResNet-50 shapes of one 8-frame clip: forward, input gradient and kernel
   gradient of each 1×1 convolution shape, and the stem max-pool's forward and gradient;
2. whole networks (ResNet-50, 8 × 224²): inference and one training step (forward, backward,
   SGD) built with Flax's ops and with this project's — the same parameters, the same math;
3. with `--shift`, TSM's temporal shift (`resnet.temporal_shift`: the channels cut by one
   `lax.split` and joined along [groups, fold] channels) against its two earlier forms, the
   parts joined along the channel axis (to 2026-12-04) and cut by three slices (2026-12-05):
   per block-input shape, and in whole TSM networks. The forms are checked equal first.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
from unittest import mock

import common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aia_jax.models import layers, resnet

# (frames·batch, height, in, out, stride) of ResNet-50's 1×1 convolutions (one 8-frame clip).
POINTWISE_SHAPES = [
    (8, 56, 64, 64, 1),
    (8, 56, 64, 256, 1),
    (8, 56, 256, 64, 1),
    (8, 56, 256, 512, 2),
    (8, 28, 512, 128, 1),
    (8, 14, 1024, 256, 1),
    (8, 7, 512, 2048, 1),
]

# (height, channels) of the maps TSM ResNet-50's blocks shift: each stage's block input.
SHIFT_SHAPES = [(56, 64), (56, 256), (28, 512), (14, 1024), (7, 2048)]


@contextlib.contextmanager
def flax_backbone_ops():
    """Builds networks with `nn.Conv(use_bias=False)` and `nn.max_pool`, as before `layers`."""
    saved = resnet.Conv, resnet.max_pool
    resnet.Conv = functools.partial(nn.Conv, use_bias=False)
    resnet.max_pool = lambda x, window, strides, padding: nn.max_pool(
        x, window, strides=strides, padding=padding
    )
    try:
        yield
    finally:
        resnet.Conv, resnet.max_pool = saved


def channel_axis_shift(x: jax.Array, fold_div: int = 8) -> jax.Array:
    """The temporal shift with its three parts joined along the channel axis (to 2026-12-04)."""
    fold = x.shape[-1] // fold_div
    no_time = [(0, 0)] * (x.ndim - 2)
    from_next = jnp.pad(x[:, 1:, ..., :fold], [(0, 0), (0, 1), *no_time])
    from_prev = jnp.pad(x[:, :-1, ..., fold : 2 * fold], [(0, 0), (1, 0), *no_time])
    return jnp.concatenate([from_next, from_prev, x[..., 2 * fold :]], axis=-1)


def sliced_group_shift(x: jax.Array, fold_div: int = 8) -> jax.Array:
    """The shift joined along [groups, fold] channels, its parts cut by three slices (2026-12-05).

    `resnet.temporal_shift` cuts them with one `lax.split` since 2026-12-06.
    """
    fold = x.shape[-1] // fold_div
    g = x.reshape(*x.shape[:-1], -1, fold)
    no_space = [(0, 0)] * (g.ndim - 2)
    from_next = jnp.pad(g[:, 1:, ..., 0:1, :], [(0, 0), (0, 1), *no_space])
    from_prev = jnp.pad(g[:, :-1, ..., 1:2, :], [(0, 0), (1, 0), *no_space])
    return jnp.concatenate([from_next, from_prev, g[..., 2:, :]], axis=-2).reshape(x.shape)


# Column title → the shift; the last is the project's.
SHIFTS = {
    "channel axis (to 12-04)": channel_axis_shift,
    "groups, 3 slices (12-05)": sliced_group_shift,
    "`temporal_shift`": resnet.temporal_shift,
}


def _op_runners(module, x):
    """Compiled forward, input gradient and kernel gradient of one conv module at `x`."""
    variables = module.init(jax.random.key(0), x)
    y = module.apply(variables, x)
    dy = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
    fwd = jax.jit(module.apply).lower(variables, x).compile()
    dx = jax.jit(lambda v, x, dy: jax.vjp(lambda x: module.apply(v, x), x)[1](dy)[0])
    dw = jax.jit(lambda v, x, dy: jax.vjp(lambda v: module.apply(v, x), v)[1](dy)[0])
    dx, dw = dx.lower(variables, x, dy).compile(), dw.lower(variables, x, dy).compile()
    return {
        "fwd": lambda: fwd(variables, x).block_until_ready(),
        "dx": lambda: dx(variables, x, dy).block_until_ready(),
        "dw": lambda: jax.block_until_ready(dw(variables, x, dy)),
    }


def _map_runners(fn, x: jax.Array, dy: jax.Array) -> dict:
    """Compiled forward and input gradient (cotangent `dy`) of a function of one map."""
    fwd = jax.jit(fn).lower(x).compile()
    grad = jax.jit(lambda x, dy: jax.vjp(fn, x)[1](dy)[0]).lower(x, dy).compile()
    return {
        "fwd": lambda: fwd(x).block_until_ready(),
        "grad": lambda: grad(x, dy).block_until_ready(),
    }


def _network_runners(name, mode, builds, clips, labels, frames) -> tuple[dict, dict]:
    """Compiles network `name` once per entry of `builds` (name → context manager to build in).

    Returns the compiled runners and their compile seconds, both keyed as `builds` is.
    """
    fns, secs = {}, {}
    for impl, build in builds.items():
        with build():
            model = common.jax_model(name, "float32", frames)
            variables = common.jax_variables(model, clips)
            fns[impl], _, secs[impl] = common.compiled_runner(model, variables, clips, labels, mode)
    return fns, secs


def _torch_conv_runners(n, h, cin, cout, stride):
    import torch

    x = torch.randn(n, cin, h, h).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, 1, 1) * 0.01
    dy = torch.randn(n, cout, h // stride, h // stride).contiguous(
        memory_format=torch.channels_last
    )
    conv_bwd = torch.ops.aten.convolution_backward

    def bwd(mask):
        with torch.no_grad():
            return conv_bwd(dy, x, w, None, [stride] * 2, [0, 0], [1, 1], False, [0, 0], 1, mask)

    def fwd():
        with torch.no_grad():
            return torch.nn.functional.conv2d(x, w, stride=stride)

    return {
        "fwd": fwd,
        "dx": lambda: bwd([True, False, False]),
        "dw": lambda: bwd([False, True, False]),
    }


def op_tables(args) -> None:
    print("### 1×1 convolutions (ms, median of round-robin repetitions)\n")
    head = "| N×H×W×C_in → C_out, stride | part | Flax `nn.Conv` | `layers.Conv` | ratio |"
    torch_cols = not args.no_torch
    if torch_cols:
        head += " PyTorch | `layers` / PyTorch |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for n, h, cin, cout, stride in POINTWISE_SHAPES:
        x = jnp.asarray(np.random.default_rng(0).normal(size=(n, h, h, cin)), jnp.float32)
        kw = dict(features=cout, kernel_size=(1, 1), strides=(stride, stride))
        impls = {
            "flax": _op_runners(nn.Conv(use_bias=False, **kw), x),
            "ours": _op_runners(layers.Conv(**kw), x),
        }
        if torch_cols:
            impls["torch"] = _torch_conv_runners(n, h, cin, cout, stride)
        fns = {f"{impl}/{part}": fn for impl, parts in impls.items() for part, fn in parts.items()}
        times = common.interleaved(fns, args.warmup, args.reps)
        for part in ("fwd", "dx", "dw"):
            ms = {impl: common.median_ms(times[f"{impl}/{part}"]) for impl in impls}
            line = f"| {n}×{h}×{h}×{cin} → {cout}, {stride} | {part} | {ms['flax']:.2f} |"
            line += f" {ms['ours']:.2f} | {ms['flax'] / ms['ours']:.1f}× |"
            if torch_cols:
                line += f" {ms['torch']:.2f} | {ms['ours'] / ms['torch']:.2f} |"
            print(line, flush=True)

    print("\n### Stem max-pool 3×3 / 2 of 8×112×112×64 (ms)\n")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 112, 112, 64)), jnp.float32)
    pads = ((1, 1), (1, 1))
    pools = {
        "flax": lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=pads),
        "ours": lambda x: layers.max_pool(x, (3, 3), (2, 2), pads),
    }
    dy = jnp.ones(jax.eval_shape(pools["ours"], x).shape, jnp.float32)
    fns = {}
    for impl, pool in pools.items():
        fns.update({f"{impl}/{part}": fn for part, fn in _map_runners(pool, x, dy).items()})
    times = common.interleaved(fns, args.warmup, args.reps)
    print("| part | Flax `nn.max_pool` | `layers.max_pool` | ratio |\n|---|---|---|---|")
    for part in ("fwd", "grad"):
        a, b = (common.median_ms(times[f"{impl}/{part}"]) for impl in pools)
        print(f"| {part} | {a:.2f} | {b:.2f} | {a / b:.1f}× |", flush=True)


def _torch_shift_runners(frames: int, h: int, c: int):
    import torch

    from tests import torch_reference

    x = torch.randn(frames, c, h, h)
    dy = torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            return torch_reference.temporal_shift(x, frames)

    def grad():  # autograd: the forward pass and the backward pass
        xg = x.detach().requires_grad_()
        return torch.autograd.grad(torch_reference.temporal_shift(xg, frames), xg, dy)

    return {"fwd": fwd, "grad": grad}


def shift_tables(args) -> None:
    earlier, ours = list(SHIFTS)[:-1], list(SHIFTS)[-1]
    print("\n### Temporal shift of a block's input, 1 clip of 8 frames")
    print("(ms, median; ours is `temporal_shift`)\n")
    head = f"| T×H×W×C | part | {' | '.join(SHIFTS)} |"
    head += "".join(f" {title.split(' (')[0]} / ours |" for title in earlier)
    if not args.no_torch:
        head += " PyTorch (release) | ours / PyTorch |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for h, c in SHIFT_SHAPES:
        x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, h, h, c)), jnp.float32)
        dy = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
        y_ours, vjp_ours = jax.vjp(resnet.temporal_shift, x)
        dx_ours = vjp_ours(dy)[0]
        fns = {}
        for title, shift in SHIFTS.items():
            y, vjp = jax.vjp(shift, x)  # the same values and gradients, or no table
            np.testing.assert_array_equal(y, y_ours, err_msg=title)
            np.testing.assert_array_equal(vjp(dy)[0], dx_ours, err_msg=title)
            fns.update({f"{title}/{part}": fn for part, fn in _map_runners(shift, x, dy).items()})
        if not args.no_torch:
            fns.update({f"torch/{k}": f for k, f in _torch_shift_runners(8, h, c).items()})
        times = common.interleaved(fns, args.warmup, args.reps)
        for part in ("fwd", "grad"):
            ms = {
                k.rsplit("/", 1)[0]: common.median_ms(t)
                for k, t in times.items()
                if k.endswith("/" + part)
            }
            line = f"| 8×{h}×{h}×{c} | {part} |" + "".join(f" {ms[t]:.2f} |" for t in SHIFTS)
            line += "".join(f" {ms[t] / ms[ours]:.1f}× |" for t in earlier)
            if not args.no_torch:
                line += f" {ms['torch']:.2f} | {ms[ours] / ms['torch']:.2f} |"
            print(line, flush=True)

    clip = f"{args.batch} clip(s) of {args.frames} × {args.size}²"
    print(f"\n### The shift in whole TSM networks, ResNet-50, {clip}, float32")
    print("(ms, median (min); paired change with its 90 % interval)\n")
    head = f"| net | mode | {' | '.join(SHIFTS)} |"
    head += "".join(f" ours against {title.split(' (')[0]} |" for title in earlier)
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    clips = common.jax_clips(args.batch, args.frames, args.size)
    labels = jnp.arange(args.batch, dtype=jnp.int32) % common.NUM_CLASSES
    # Each network is built with its blocks calling that form of the shift.
    builds = {
        title: functools.partial(mock.patch.object, resnet, "temporal_shift", shift)
        for title, shift in SHIFTS.items()
    }
    for placement in args.placements:
        name = common.model_name("TSM", placement)
        for mode in args.modes:
            fns, _ = _network_runners(name, mode, builds, clips, labels, args.frames)
            times = common.interleaved(fns, args.warmup, args.reps)
            line = f"| {name} | {mode} |"
            line += "".join(
                f" {common.median_ms(t):.0f} ({common.min_ms(t):.0f}) |" for t in times.values()
            )
            for title in earlier:
                change = common.paired_overhead(times[ours], times[title])
                line += f" {common.fmt_overhead(*change)} |"
            print(line, flush=True)


def network_tables(args) -> None:
    clip = f"{args.batch} clip(s) of {args.frames} × {args.size}²"
    print(f"\n### Whole networks, ResNet-50, {clip}, float32 (ms, median (min))\n")
    print("| net | mode | Flax ops | `layers` ops | speed-up | compile s (Flax / layers) |")
    print("|---|---|---|---|---|---|")
    clips = common.jax_clips(args.batch, args.frames, args.size)
    labels = jnp.arange(args.batch, dtype=jnp.int32) % common.NUM_CLASSES
    for form in args.forms:
        for placement in args.placements:
            name = common.model_name(form, placement)
            for mode in args.modes:
                builds = {"flax": flax_backbone_ops, "ours": contextlib.nullcontext}
                fns, secs = _network_runners(name, mode, builds, clips, labels, args.frames)
                times = common.interleaved(fns, args.warmup, args.reps)
                med = {k: common.median_ms(t) for k, t in times.items()}
                low = {k: common.min_ms(t) for k, t in times.items()}
                print(
                    f"| {name} | {mode} | {med['flax']:.0f} ({low['flax']:.0f}) |"
                    f" {med['ours']:.0f} ({low['ours']:.0f}) | {med['flax'] / med['ours']:.2f}× |"
                    f" {secs['flax']:.1f} / {secs['ours']:.1f} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forms", type=common.csv, default=["C2D", "TSM", "I3D"])
    parser.add_argument("--placements", type=common.csv, default=["none"])
    parser.add_argument("--modes", type=common.csv, default=["infer", "train"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-ops", action="store_true", help="skip the per-op tables")
    parser.add_argument("--no-networks", action="store_true", help="skip the network table")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns")
    parser.add_argument("--shift", action="store_true", help="add the temporal shift's tables")
    args = parser.parse_args()
    common.check_choices(parser, "--forms", args.forms, common.FORMS)
    common.check_choices(parser, "--placements", args.placements, list(common.models.PLACEMENTS))
    common.check_choices(parser, "--modes", args.modes, ["infer", "train"])
    common.check_at_least(parser, args, 1, "batch", "frames", "size", "reps")
    common.check_at_least(parser, args, 0, "warmup")

    common.print_environment(common.environment())
    if not args.no_ops:
        op_tables(args)
    if not args.no_networks:
        network_tables(args)
    if args.shift:
        shift_tables(args)
    print(f"\nloadavg at end: {tuple(round(v, 2) for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
