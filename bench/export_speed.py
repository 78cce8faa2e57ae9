"""The exported artefact against the jitted network it came from: is serving it slower?

    python bench/export_speed.py                          # TSM+CinST, f32, batch 1 and 4
    python bench/export_speed.py --form C2D --placement none --batch-sizes 1 --reps 5

Users of other toolboxes find their exported models slower than the framework (an ONNX graph
slower than eager PyTorch). Here the network is exported as `python -m aia_jax.export` does it
(`aia_jax.export.export_model`: uint8 clips → logits, weights as constants, a symbolic batch),
serialized and deserialized, then timed round-robin against `jax.jit` of the same inference
function (`aia_jax.export.inference_fn`), with a paired ratio per batch size. Three ways to call
the artefact are timed:

- `LoadedExport`: what `aia_jax.export.load_exported(path)(clips)` does (numpy in and out);
- `jit(call)`: `jax.jit(exported.call)`, the way to call it inside a larger jitted program;
- and the source network under `jax.jit`, the reference.

Also printed: the export, serialization and deserialization times, the artefact's size, and
each path's first call (compilation included). Not part of the test suite: nothing asserts.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import common
import jax
import numpy as np

from aia_jax import export, models


def _seconds(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--form", default="TSM", choices=common.FORMS)
    parser.add_argument("--placement", default="CinST")
    parser.add_argument("--dtype", default="float32", choices=tuple(common.DTYPES))
    parser.add_argument("--batch-sizes", type=common.ints, default=[1, 4], help="e.g. 1,4")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    common.check_at_least(parser, args, 1, "reps", "frames", "size")
    common.check_at_least(parser, args, 0, "warmup")
    common.check_choices(parser, "--placement", [args.placement], list(models.PLACEMENTS))

    info = common.environment()
    common.print_environment(info)
    name = common.model_name(args.form, args.placement)
    model = common.jax_model(name, args.dtype, args.frames)
    variables = common.jax_variables(model, common.jax_clips(1, args.frames, args.size))
    dtype = common.DTYPES[args.dtype]
    infer = export.inference_fn(model, variables, compute_dtype=dtype)

    exported, export_s = _seconds(
        lambda: export.export_model(model, variables, crop_size=args.size, compute_dtype=dtype)
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.jaxexport")
        _, write_s = _seconds(lambda: export.write_export(path, exported, {}))
        size_mb = os.path.getsize(path) / 2**20
        loaded, load_s = _seconds(lambda: export.load_exported(path))
    print(
        f"\n{name} {args.dtype} {args.frames}x{args.size}²: export {export_s:.1f} s, "
        f"serialize+write {write_s:.1f} s ({size_mb:.0f} MiB), read+deserialize {load_s:.1f} s"
    )

    jit_source = jax.jit(infer)
    jit_call = jax.jit(loaded.exported.call)
    rows = []
    for batch in args.batch_sizes:
        clips = np.random.default_rng(batch).integers(
            0, 256, (batch, args.frames, args.size, args.size, 3), dtype=np.uint8
        )
        on_device = jax.device_put(clips)
        fns = {
            "source": lambda x=on_device: jit_source(x).block_until_ready(),
            "jit(call)": lambda x=on_device: jit_call(x).block_until_ready(),
            "LoadedExport": lambda x=clips: loaded(x),
        }
        first = {k: _seconds(fn)[1] for k, fn in fns.items()}
        # The same numbers from every path (a wrong artefact must not look fast).
        want = np.asarray(jit_source(on_device))
        for k, got in (("jit(call)", jit_call(on_device)), ("LoadedExport", loaded(clips))):
            err = float(np.max(np.abs(np.asarray(got) - want)))
            print(f"batch {batch}: {k} max |logit difference| vs source = {err:.2e}")
        times = common.interleaved(fns, args.warmup, args.reps)
        rows.append((batch, first, times))

    print(
        "\n| batch | path | first call (s) | median ms | min ms | clips/s | vs source "
        "(paired, 90 % CI) |\n|---|---|---|---|---|---|---|"
    )
    for batch, first, times in rows:
        for k in ("source", "jit(call)", "LoadedExport"):
            med = common.median_ms(times[k])
            ratio = (
                "—"
                if k == "source"
                else common.fmt_overhead(*common.paired_overhead(times[k], times["source"]))
            )
            print(
                f"| {batch} | {k} | {first[k]:.1f} | {med:.1f} | {common.min_ms(times[k]):.1f} "
                f"| {batch / med * 1e3:.2f} | {ratio} |"
            )


if __name__ == "__main__":
    main()
