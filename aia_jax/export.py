"""Export a trained network for serving: `jax.export` StableHLO with a symbolic batch size.

The exported function is the whole inference path, weights included:

    uint8 clips [b, T, H, W, 3] (RGB, 0..255)  →  float32 logits [b, num_classes]

normalisation (`/255`, ImageNet mean/std, as `aia_jax.data.normalize`) happens inside, so a
server feeds decoded, sampled and cropped frames as they are. `b` is symbolic: one artefact
serves any batch size. T, H and W are fixed at export (the model's `num_segments` and the crop
size). With `input_dtype='float32'` the function instead takes clips that are already normalised
(the network's own input), for callers that do their own pre-processing.

Files: `<output>` holds `Exported.serialize()` bytes (StableHLO plus calling convention), and
`<output>.json` a sidecar with the input/output signature, class names, the pre-processing
settings `aia_jax.predict` uses, the model's `model.json` and the artefact's SHA-256. Both are
written atomically (temporary file, then rename). `load_exported(output)` reads both back and
refuses a sidecar written for another artefact; it needs JAX but none of this project's model
code. `--platforms cpu,cuda` exports for both backends without a GPU (jax lowers for each);
the CUDA side has not been run on a GPU by this project's tests.

    python -m aia_jax.export --checkpoint DIR --output model.jaxexport [--crop-size 224]
        [--input-dtype uint8|float32] [--dtype float32|bfloat16] [--platforms cpu,cuda]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aia_jax.errors import (
    ArgumentParser,
    InputNotFoundError,
    UserError,
    checked_positive_int,
    one_line,
    positive_int,
    reported_as_usage_errors,
)
from aia_jax.fileio import write_atomically

SIDECAR_SUFFIX = ".json"
# What `jax.export` lowers for.
LOWERING_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
FORMAT = "aia-jax-export"
VERSION = 1
INPUT_DTYPES = ("uint8", "float32")


def _normalize(video: jax.Array, dtype: Any) -> jax.Array:
    from aia_jax import data  # the pipeline's own normalisation, so served = evaluated

    return data.normalize(video, dtype)


def inference_fn(
    model: Any,
    variables: Mapping[str, Any],
    *,
    input_dtype: str = "uint8",
    compute_dtype: Any = jnp.float32,
) -> Callable[[jax.Array], jax.Array]:
    """`clips → float32 logits` with `variables` closed over (they become constants).

    Args:
      model: a `VideoNet`.
      variables: `{'params', 'batch_stats'}`.
      input_dtype: 'uint8' (raw RGB, normalised inside) or 'float32' (already normalised).
      compute_dtype: the network's activation dtype (the model's `dtype` should agree).
    """
    if input_dtype not in INPUT_DTYPES:
        raise UserError(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
    variables = jax.tree.map(jnp.asarray, dict(variables))

    def infer(clips: jax.Array) -> jax.Array:
        if input_dtype == "uint8":
            clips = _normalize(clips, compute_dtype)
        else:
            clips = clips.astype(compute_dtype)
        return model.apply(variables, clips, train=False).astype(jnp.float32)

    return infer


def export_model(
    model: Any,
    variables: Mapping[str, Any],
    *,
    crop_size: int,
    input_dtype: str = "uint8",
    compute_dtype: Any = jnp.float32,
    platforms: Sequence[str] | None = None,
) -> jax.export.Exported:
    """`jax.export`s `inference_fn` for clips `[b, T, crop, crop, 3]` with a symbolic `b`.

    Args:
      platforms: e.g. `('cpu', 'cuda')` to serve on either; default the current backend.
    """
    unknown = [p for p in platforms or () if p not in LOWERING_PLATFORMS]
    if unknown:
        raise UserError(
            f"platforms {', '.join(map(repr, unknown))}: expected some of "
            f"{', '.join(LOWERING_PLATFORMS)}"
        )
    checked_positive_int("crop_size", crop_size)
    (b,) = jax.export.symbolic_shape("b", constraints=("b >= 1",))
    spec = jax.ShapeDtypeStruct(
        (b, model.num_segments, crop_size, crop_size, 3), jnp.dtype(input_dtype)
    )
    fn = inference_fn(model, variables, input_dtype=input_dtype, compute_dtype=compute_dtype)
    return jax.export.export(jax.jit(fn), platforms=platforms)(spec)


def write_export(
    path: str, exported: jax.export.Exported, sidecar: Mapping[str, Any]
) -> tuple[str, str]:
    """Writes the serialized artefact and its JSON sidecar (with the artefact's `sha256`).

    Each file is replaced atomically; a crash between the two leaves a sidecar whose `sha256`
    names the other artefact, which `load_exported` refuses. Returns both paths.
    """
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory; --output names the artefact file to write")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        blob = exported.serialize()
    except ImportError as e:  # jax's serializer needs the optional `flatbuffers` package
        raise ImportError(f"{e} (pip install flatbuffers)") from e
    side = path + SIDECAR_SUFFIX
    text = json.dumps({**sidecar, "sha256": hashlib.sha256(blob).hexdigest()}, indent=2)
    write_atomically(path, bytes(blob))
    write_atomically(side, (text + "\n").encode())
    return path, side


def make_sidecar(
    exported: jax.export.Exported,
    *,
    meta: Mapping[str, Any],
    input_dtype: str,
    compute_dtype: Any,
    class_names: Sequence[str] | None,
) -> dict[str, Any]:
    """The JSON description of an artefact: signature, pre-processing, classes, model."""
    (out_aval,) = exported.out_avals
    shape, _ = _signature(exported)
    return {
        "format": FORMAT,
        "version": VERSION,
        "input": {
            "shape": shape,
            "dtype": input_dtype,
            "layout": "[batch, frames, height, width, RGB]",
            "preprocessing": (
                "raw RGB 0..255; /255 and ImageNet mean/std normalisation inside"
                if input_dtype == "uint8"
                else "already normalised: (x/255 - ImageNet mean) / ImageNet std"
            ),
        },
        "output": {
            "shape": [d if isinstance(d, int) else str(d) for d in out_aval.shape],
            "dtype": "float32",
            "kind": "logits (softmax for probabilities)",
        },
        "compute_dtype": jnp.dtype(compute_dtype).name,
        "platforms": list(exported.platforms),
        "class_names": list(class_names) if class_names else None,
        "model": dict(meta),
        "jax_version": jax.__version__,
    }


@dataclasses.dataclass
class LoadedExport:
    """A deserialized artefact: call it with clips, get numpy logits."""

    exported: jax.export.Exported
    sidecar: dict[str, Any]

    @property
    def class_names(self) -> list[str] | None:
        return self.sidecar.get("class_names")

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self.exported.in_avals[0].dtype)

    def __call__(self, clips: Any) -> np.ndarray:
        clips = np.asarray(clips)
        if clips.dtype != self.input_dtype:
            raise TypeError(f"expected {self.input_dtype} clips, got {clips.dtype}")
        (in_aval,), (out_aval,) = self.exported.in_avals, self.exported.out_avals
        if clips.shape[:1] == (0,) and clips.shape[1:] == tuple(in_aval.shape[1:]):
            # jax.export's symbolic batch is >= 1: an empty batch has no logits to compute.
            return np.zeros((0, *out_aval.shape[1:]), np.float32)
        return np.asarray(self.exported.call(clips))


def _signature(exported: jax.export.Exported) -> tuple[list[Any], str]:
    """Input shape (symbolic dimensions as strings) and dtype, as the sidecar records them."""
    (in_aval,) = exported.in_avals
    shape = [d if isinstance(d, int) else str(d) for d in in_aval.shape]
    return shape, np.dtype(in_aval.dtype).name


def load_exported(path: str) -> LoadedExport:
    """Reads `path` (serialized `Exported`) and its sidecar `path.json` (optional).

    Raises:
      UserError: `path` is missing or not an artefact, or the sidecar is not valid JSON or
        describes another artefact.
    """
    if not os.path.isfile(path):
        raise InputNotFoundError(f"{path}: exported model not found")
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    try:
        exported = jax.export.deserialize(blob)
    except Exception as e:  # noqa: BLE001 - a foreign or damaged file fails anywhere in parsing
        raise UserError(
            f"{path}: not a model exported by aia_jax.export ({type(e).__name__}: "
            f"{one_line(e)[:200]})"
        ) from None
    side = path + SIDECAR_SUFFIX
    sidecar: dict[str, Any] = {}
    if os.path.exists(side):
        try:
            with open(side) as f:
                sidecar = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{side}: not a readable JSON sidecar ({one_line(e)[:200]})") from None
        if not isinstance(sidecar, dict):
            raise UserError(f"{side}: not a sidecar written by aia_jax.export (not an object)")
        # Its class names and pre-processing only hold for the artefact it was written with.
        digest = sidecar.get("sha256")
        if digest is not None and digest != hashlib.sha256(blob).hexdigest():
            raise UserError(
                f"{side}: written for another artefact than {path} (sha256 differs); "
                "export again or remove the sidecar"
            )
        shape, dtype = _signature(exported)
        recorded = sidecar.get("input") or {}
        if recorded and (recorded.get("shape"), recorded.get("dtype")) != (shape, dtype):
            raise UserError(
                f"{side}: describes {recorded.get('dtype')} {recorded.get('shape')} clips, but "
                f"{path} takes {dtype} {shape}; export again or remove the sidecar"
            )
    return LoadedExport(exported, sidecar)


# ---------------------------------------------------------------------------------------------
# From a model directory.


def _checked_crop_size(
    checkpoint: str, settings: Mapping[str, Any], crop_size: int, *, given: bool
) -> int:
    """`crop_size`, unless the sidecar's resize makes frames too small for its centre crop.

    Same rule as `aia_jax.predict.eval_geometry`: the crop fits in the resized frame's short
    side. Checked before the export, since such an artefact could never be fed its own clips.
    """
    short_side, resize = int(settings["resize_short_side"]), tuple(settings["resize"])
    limit = short_side or min(resize)
    if crop_size > limit:
        how = (
            f"short side resized to {short_side}"
            if short_side
            else f"frames resized to {resize[0]},{resize[1]}"
        )
        what = (
            f"--crop-size {crop_size}"
            if given
            else f"crop size {crop_size} (the workdir config's data.crop_size)"
        )
        raise UserError(
            f"{what} is larger than {checkpoint}'s preprocessing resize ({how}): clips cut "
            f"from its frames can never be that size; give a --crop-size of at most {limit}"
        )
    return crop_size


def export_checkpoint(
    checkpoint: str,
    output: str,
    *,
    crop_size: int | None = None,
    input_dtype: str = "uint8",
    dtype: str = "float32",
    platforms: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Exports a model directory or training workdir (its best checkpoint) to `output`.

    Args:
      crop_size: H = W of the clips; default the workdir config's `data.crop_size`, else 224.
      class_names: default those `aia_jax.predict.find_class_names` finds for the checkpoint.

    Returns:
      The sidecar dict (also written to `output.json`).
    """
    from aia_jax import modelio, predict

    # `crop_size or default` would turn a 0 into the default without a word.
    if crop_size is not None:
        checked_positive_int("crop_size", crop_size)
    modelio.read_meta(checkpoint)  # a missing checkpoint is named before the crop is checked
    settings = predict.preprocessing_settings(checkpoint)
    crop_size = _checked_crop_size(
        checkpoint,
        settings,
        int(settings["crop_size"] if crop_size is None else crop_size),
        given=crop_size is not None,
    )
    variables, meta = modelio.load_model(checkpoint)
    compute_dtype = jnp.dtype(dtype)
    model = modelio.create_model(meta, dtype=compute_dtype)
    class_names = predict.checked_class_names(checkpoint, meta, model.num_classes, class_names)
    exported = export_model(
        model,
        variables,
        crop_size=crop_size,
        input_dtype=input_dtype,
        compute_dtype=compute_dtype,
        platforms=platforms,
    )
    sidecar = make_sidecar(
        exported,
        meta={**meta, "checkpoint": os.path.abspath(checkpoint)},
        input_dtype=input_dtype,
        compute_dtype=compute_dtype,
        class_names=class_names,
    )
    sidecar["crop_size"] = crop_size
    # What `aia_jax.predict` reads clips with (resize, sampling, ...), so a server can match it.
    sidecar["preprocessing"] = {**settings, "crop_size": crop_size}
    write_export(output, exported, sidecar)
    return sidecar


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m aia_jax.export",
        description="Export a model directory or training workdir as batch-polymorphic StableHLO.",
    )
    parser.add_argument("--checkpoint", required=True, help="model directory or training workdir")
    parser.add_argument("--output", required=True, help="artefact path, e.g. model.jaxexport")
    parser.add_argument(
        "--crop-size",
        type=positive_int,
        default=None,
        help="clip height = width (default: the config's crop_size, else 224)",
    )
    parser.add_argument(
        "--input-dtype",
        choices=INPUT_DTYPES,
        default="uint8",
        help="uint8: raw RGB, normalised inside (default); float32: normalised",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype of the network",
    )
    parser.add_argument(
        "--platforms",
        default=None,
        help="comma-separated, e.g. cpu,cuda (default: this machine's backend)",
    )
    parser.add_argument("--classnames", default=None, help="file with one class name per line")
    args = parser.parse_args(argv)
    from aia_jax import predict

    with reported_as_usage_errors(parser.prog):
        names = (
            predict.read_classnames_flag(args.classnames, args.checkpoint)
            if args.classnames
            else None
        )
        platforms = tuple(p for p in args.platforms.split(",") if p) if args.platforms else None
        sidecar = export_checkpoint(
            args.checkpoint,
            args.output,
            crop_size=args.crop_size,
            input_dtype=args.input_dtype,
            dtype=args.dtype,
            platforms=platforms,
            class_names=names,
        )
    print(
        f"Wrote {args.output} and {args.output}{SIDECAR_SUFFIX}: {sidecar['input']['dtype']} "
        f"{sidecar['input']['shape']} -> logits {sidecar['output']['shape']} "
        f"on {', '.join(sidecar['platforms'])}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
