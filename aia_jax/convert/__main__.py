"""`python -m aia_jax.convert`: release checkpoints and ImageNet weights ⇄ model directories.

Run with `--help` (and `COMMAND --help`) for the commands. Errors exit with status 2 and one
line on stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from aia_jax.errors import ArgumentParser, one_line, positive_int

DESCRIPTION = """\
Convert between the PyTorch release of Attention in Attention and aia-jax model directories.

commands:
  torch2flax  a release checkpoint (ckpt.best.pth.tar from the authors' PyTorch code, or a
              .safetensors file) -> a model directory
  flax2torch  a model directory (or training workdir) -> a release-format .pth.tar or
              .safetensors file
  imagenet    torchvision ImageNet ResNet-50/101 weights (e.g. resnet50-19c8e357.pth) -> a
              model directory whose backbone starts from ImageNet (C2D, TSM or I3D)

A model directory (model.json + an Orbax checkpoint) is what the trainer's init_from and the
evaluator read. PyTorch is needed only to write .pth files; every .pth file (zip or legacy
pre-1.6 format) and .safetensors file is read without it.
"""

EXAMPLES = """\
examples:
  python -m aia_jax.convert torch2flax --checkpoint ckpt.best.pth.tar \\
      --name TSM_CinST_BN --num-segments 8 --output models/tsm_cinst
  python -m aia_jax.convert flax2torch --checkpoint models/tsm_cinst --output ckpt.pth.tar
  python -m aia_jax.convert flax2torch --checkpoint models/tsm_cinst --output ckpt.safetensors
  python -m aia_jax.convert imagenet --weights resnet50-19c8e357.pth \\
      --name TSM_CinST_BN --num-classes 174 --output models/tsm_cinst_imagenet
"""

NAME_HELP = (
    "network name of the release, <C2D|TSM>[_<placement>_BN], e.g. TSM, C2D, TSM_CinST_BN, "
    "C2D_STinC_BN (placements: C, ST, C2ST, ST2C, CplusST, CinST, STinC, CinST2STinC, "
    "STinC2CinST, STinCplusCinST)"
)


class CliError(Exception):
    """A failure reported as one line on stderr with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m aia_jax.convert`."""
    parser = ArgumentParser(
        prog="python -m aia_jax.convert",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t2f = commands.add_parser(
        "torch2flax",
        help="release checkpoint (.pth.tar / .safetensors) -> model directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Convert a checkpoint of the authors' PyTorch release into a model directory.

            The file is read without torch and without running pickled code (torch.save files,
            zip or legacy pre-1.6 format; the release's {'epoch', 'arch', 'state_dict', ...}
            wrapper and DataParallel's 'module.' prefix are handled; .safetensors works too). Every
            tensor must be used and every variable filled: otherwise the command names the
            missing, unexpected and wrong-shape keys, and which of depth, classes, classifier
            or attention placement disagrees with the checkpoint.

            --name is required because the keys do not tell everything: TSM and C2D checkpoints
            hold exactly the same keys (the temporal shift has no weights), and so do CinST and
            STinC, C2ST and CplusST, and CinST2STinC, STinC2CinST and STinCplusCinST (same
            units, combined differently). Give the name the checkpoint was trained as; what the
            keys do show (units per block, depth, classes) is checked against it.
            """
        ),
        epilog=(
            "example:\n  python -m aia_jax.convert torch2flax --checkpoint ckpt.best.pth.tar "
            "--name TSM_CinST_BN --num-segments 8 --output models/tsm_cinst"
        ),
    )
    t2f.add_argument("--checkpoint", required=True, metavar="CKPT", help="release checkpoint")
    t2f.add_argument("--name", required=True, help=NAME_HELP)
    t2f.add_argument("--output", required=True, metavar="DIR", help="new model directory")
    _shape_arguments(t2f, classes_required=False)
    t2f.add_argument(
        "--dropout",
        type=float,
        default=None,
        metavar="P",
        help="dropout before the classifier (recorded for fine-tuning); default 0 when the "
        "checkpoint's classifier is base_model.fc (the release's dropout-0 layout), else 0.5",
    )

    f2t = commands.add_parser(
        "flax2torch",
        help="model directory -> release-format .pth.tar / .safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Write a model directory (or the best checkpoint of a training workdir) in the
            release's format: the state dict of the release's VideoNet wrapped in DataParallel
            (keys 'module.base_model...', 'module.new_fc...'), in the release's key order.

            OUTPUT ending in .safetensors is written with the safetensors package (no torch
            needed); any other name (.pth.tar, .pth) with torch.save, wrapped as the release's
            training script saves: {'epoch', 'arch', 'state_dict', 'optimizer': None,
            'best_prec1'}, which the release's test script loads ('epoch' and 'best_prec1':
            those torch2flax recorded, or a workdir checkpoint's epochs trained and val top-1
            in percent, from its metrics.jsonl). BatchNorm num_batches_tracked counters are
            those recorded by torch2flax, else the workdir's step, else 0. I3D networks have
            no counterpart in the release; their kernels are written in PyTorch's Conv3d
            layout.
            """
        ),
        epilog=(
            "examples:\n  python -m aia_jax.convert flax2torch --checkpoint models/tsm_cinst "
            "--output ckpt.pth.tar\n  python -m aia_jax.convert flax2torch --checkpoint "
            "models/tsm_cinst --output ckpt.safetensors"
        ),
    )
    f2t.add_argument(
        "--checkpoint", required=True, metavar="DIR", help="model directory or training workdir"
    )
    f2t.add_argument(
        "--output", required=True, metavar="PATH", help=".pth.tar, .pth or .safetensors file"
    )
    f2t.add_argument(
        "--bare",
        action="store_true",
        help="write the plain state dict: no wrapper, no 'module.' prefix (loads directly into "
        "an unwrapped VideoNet with load_state_dict)",
    )
    f2t.add_argument(
        "--step", type=int, default=None, help="training workdir only: which checkpoint step"
    )

    inet = commands.add_parser(
        "imagenet",
        help="torchvision ImageNet ResNet weights -> model directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Start a network from torchvision's ImageNet ResNet-50/101 weights, as the release
            does: every backbone tensor comes from the weights, the attention units and the
            classifier keep their initialisers. The torchvision fc (1000 classes) is dropped,
            unless the network has dropout 0 and 1000 classes (its classifier is then the
            same layer and is copied). For I3D names the 2D kernels are mean-inflated (stem
            7x7 -> 5x7x7, inflated blocks' conv1 1x1 -> 3x1x1, repeated over time and divided
            by the temporal size).

            Depth and width are read from the weights; they must match the network. Both
            torch.save formats (zip, and the legacy one of PyTorch < 1.6 that torchvision's 2017
            downloads such as resnet50-19c8e357.pth use) and .safetensors are read without
            torch.
            """
        ),
        epilog=(
            "example:\n  python -m aia_jax.convert imagenet --weights resnet50-19c8e357.pth "
            "--name TSM_CinST_BN --num-classes 174 --output models/tsm_cinst_imagenet"
        ),
    )
    inet.add_argument(
        "--weights",
        required=True,
        metavar="PTH",
        help="torchvision resnet50/resnet101 state dict (.pth or .safetensors)",
    )
    inet.add_argument("--name", required=True, help=NAME_HELP + ", or I3D[_<placement>_BN]")
    inet.add_argument("--output", required=True, metavar="DIR", help="new model directory")
    _shape_arguments(inet, classes_required=True)
    inet.add_argument(
        "--dropout",
        type=float,
        default=0.5,
        metavar="P",
        help="dropout before the classifier (default 0.5)",
    )
    inet.add_argument("--seed", type=int, default=0, help="seed of the head/attention init")
    return parser


def _shape_arguments(parser: argparse.ArgumentParser, *, classes_required: bool) -> None:
    parser.add_argument(
        "--num-segments",
        type=positive_int,
        default=8,
        metavar="T",
        help="frames per clip the network is built for (default 8; the weights do not record it)",
    )
    parser.add_argument(
        "--num-classes",
        type=positive_int,
        required=classes_required,
        default=None,
        metavar="N",
        help="classifier size"
        + ("" if classes_required else " (default: read from the checkpoint's classifier)"),
    )
    parser.add_argument(
        "--depth",
        type=int,
        choices=(50, 101, 14),
        default=None,
        help="ResNet depth (default: read from the number of stage-3 blocks; 14 is the tiny "
        "test net)",
    )
    parser.add_argument(
        "--width",
        type=positive_int,
        default=None,
        metavar="W",
        help="stem width (default: read from the weights; 64 in the release)",
    )


def _fresh_output(directory: str) -> None:
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise CliError(f"{directory}: already exists; give a new (or empty) output directory")


def _create(name: str, **kwargs: Any) -> Any:
    from aia_jax import models

    try:
        return models.create(name, **kwargs)
    except ValueError as e:
        raise CliError(str(e)) from None


def _canonical(name: str, *, allow_i3d: bool) -> str:
    from aia_jax import models

    try:
        spec = models.parse_name(name)
    except ValueError as e:
        raise CliError(str(e)) from None
    if spec.form == "I3D" and not allow_i3d:
        raise CliError(
            f"{name}: the PyTorch release has no I3D networks, so there are no I3D checkpoints "
            "to convert; start an I3D from ImageNet with the 'imagenet' command"
        )
    return spec.canonical


def torch2flax(args: argparse.Namespace) -> str:
    """The `torch2flax` command; returns the summary line."""
    from aia_jax import convert, modelio
    from aia_jax.convert.release import head_dropout, leading_dim

    name = _canonical(args.name, allow_i3d=False)
    _fresh_output(args.output)
    state_dict, info = convert.read_checkpoint(args.checkpoint)
    # Keys as `from_torch` reads them: a checkpoint of a model wrapped twice in DataParallel
    # keeps one `module.` after reading, and the width lookup below must see through it.
    state_dict = convert.strip_prefix(state_dict)
    found = convert.describe_checkpoint(state_dict)
    if found["head"] is None and convert.describe_torchvision(state_dict)["width"] is not None:
        raise CliError(
            f"{args.checkpoint}: holds torchvision ImageNet weights (conv1, layer1..4, fc keys), "
            "not a release checkpoint; use the 'imagenet' command"
        )
    depth = args.depth or found["depth"]
    if depth is None:
        raise CliError(f"{args.checkpoint}: cannot tell the ResNet depth; pass --depth")
    num_classes = args.num_classes or found["num_classes"]
    if num_classes is None:
        raise CliError(f"{args.checkpoint}: no classifier found; pass --num-classes")
    conv1 = state_dict.get("base_model.conv1.weight")
    width = args.width or (
        leading_dim(conv1, "base_model.conv1.weight", 4) if conv1 is not None else 64
    )
    dropout = args.dropout if args.dropout is not None else head_dropout(found["head"], 0.5)
    create_args = dict(
        num_classes=num_classes,
        num_segments=args.num_segments,
        depth=depth,
        width=width,
        dropout=dropout,
    )
    model = _create(name, **create_args)
    variables = convert.from_torch(state_dict, model)
    counters = convert.batch_counters(state_dict)
    values = set(counters.values())
    source = {
        "format": "pytorch-release",
        "file": os.path.abspath(args.checkpoint),
        **info,
        # One number when every BatchNorm counted the same batches (a normal release run).
        "num_batches_tracked": values.pop() if len(values) == 1 else counters,
    }
    modelio.save_model(
        args.output, variables, modelio.model_meta(name, **create_args, source=source)
    )
    return (
        f"wrote {args.output}: {name} ResNet-{depth} (width {width}), {num_classes} classes, "
        f"{args.num_segments} segments, dropout {dropout}, from {args.checkpoint}"
    )


def flax2torch(args: argparse.Namespace) -> str:
    """The `flax2torch` command; returns the summary line."""
    from aia_jax import convert, modelio

    out = args.output
    if os.path.isdir(out):
        raise CliError(
            f"{out}: is a directory; give a file name ending in .pth.tar or .safetensors"
        )
    if not os.path.isdir(args.checkpoint):
        raise CliError(f"{args.checkpoint}: no such model directory")
    try:
        variables, meta = modelio.load_model(args.checkpoint, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for damaged checkpoints
        first = str(e).splitlines()[0] if str(e) else ""
        raise CliError(
            f"{args.checkpoint}: cannot read the model directory ({type(e).__name__}: {first:.200})"
        ) from None
    try:
        model = modelio.create_model(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise CliError(f"{args.checkpoint}: model.json does not describe a network ({e})") from None
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    counters = source.get("num_batches_tracked", meta.get("step", 0))
    state_dict = convert.to_torch(variables, model, num_batches_tracked=counters)
    if args.bare:
        state_dict = convert.strip_prefix(state_dict)
    epoch, best_prec1 = int(source.get("epoch", 0) or 0), float(source.get("best_prec1", 0) or 0)
    if "step" in meta:  # a training workdir: the checkpoint's own epoch and val top-1
        epoch, best_prec1 = _workdir_epoch_and_top1(args.checkpoint, meta["step"])
    convert.save_torch(
        state_dict,
        out,
        wrap=not args.bare,
        epoch=epoch,
        arch=f"resnet{model.depth}",
        best_prec1=best_prec1,
    )
    return f"wrote {out}: {meta['name']} ResNet-{model.depth}, {len(state_dict)} tensors"


def _workdir_epoch_and_top1(workdir: str, step: int) -> tuple[int, float]:
    """The release wrapper's `epoch` (epochs trained) and `best_prec1` (val top-1 in percent)
    of a workdir's checkpoint at `step`, from its `metrics.jsonl`; 0 where it has none."""
    from aia_jax.train import metrics

    try:
        records = metrics.read_metrics(workdir)
    except (OSError, ValueError):
        return 0, 0.0  # the wrapper's entries are informative; the tensors are what counts
    at_step = [r for r in records if r.get("step") == step]
    epoch = max((math.floor(r["epoch"]) for r in at_step if "epoch" in r), default=0)
    top1 = [r["val/top1"] for r in at_step if "val/top1" in r]
    return epoch, 100 * float(top1[-1]) if top1 else 0.0


def imagenet(args: argparse.Namespace) -> str:
    """The `imagenet` command; returns the summary line."""
    from aia_jax import convert, modelio
    from aia_jax.convert import imagenet as imagenet_init

    name = _canonical(args.name, allow_i3d=True)
    _fresh_output(args.output)
    state_dict = convert.load_torch_checkpoint(args.weights)
    found = convert.describe_torchvision(state_dict)
    if found["release"]:
        raise CliError(
            f"{args.weights}: holds a release network (base_model.* keys), not torchvision "
            "ImageNet weights; use the 'torch2flax' command"
        )
    depth = args.depth or found["depth"]
    if depth is None:
        raise CliError(f"{args.weights}: cannot tell the ResNet depth; pass --depth")
    width = args.width or found["width"] or 64
    create_args = dict(
        num_classes=args.num_classes,
        num_segments=args.num_segments,
        depth=depth,
        width=width,
        dropout=args.dropout,
    )
    model = _create(name, **create_args)
    variables = convert.from_torchvision(state_dict, model, seed=args.seed)
    kept_fc = imagenet_init.keeps_fc(state_dict, model)
    source = {
        "format": "torchvision-imagenet",
        "file": os.path.abspath(args.weights),
        "seed": args.seed,
    }
    modelio.save_model(
        args.output, variables, modelio.model_meta(name, **create_args, source=source)
    )
    head = "ImageNet fc copied" if kept_fc else "torchvision fc dropped, new classifier"
    return (
        f"wrote {args.output}: {name} ResNet-{depth} (width {width}), {args.num_classes} classes, "
        f"{args.num_segments} segments; backbone from {args.weights}, {head}"
    )


COMMANDS = {"torch2flax": torch2flax, "flax2torch": flax2torch, "imagenet": imagenet}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0, or 2 on any reported error)."""
    args = build_parser().parse_args(argv)
    from aia_jax.convert import CheckpointError, ConversionError

    try:
        print(COMMANDS[args.command](args))
    except (CliError, CheckpointError, ConversionError, ImportError, OSError) as e:
        print(f"python -m aia_jax.convert {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
