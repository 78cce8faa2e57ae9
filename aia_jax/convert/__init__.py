"""Conversion between PyTorch weights and the Flax networks of `aia_jax.models`.

- Release checkpoints (`ckpt.best.pth.tar` of the authors' PyTorch code) ⇄ Flax variables:
  `load_torch_checkpoint` (no torch needed), `from_torch`, `to_torch`, `save_torch`.
- torchvision ImageNet ResNets → the backbone of any network (`from_torchvision`).
- The command line `python -m aia_jax.convert {torch2flax,flax2torch,imagenet}` (see `--help`)
  writes and reads *model directories* (`aia_jax.modelio`).

Nothing here imports torch at import time; torch is used only to write `.pth` files, when it is
installed (reading needs no torch).
"""

from __future__ import annotations

import io
import numbers
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from aia_jax.convert.imagenet import describe_torchvision, from_torchvision
from aia_jax.convert.release import (
    ConversionError,
    batch_counters,
    describe_checkpoint,
    from_torch,
    strip_prefix,
    to_torch,
)
from aia_jax.convert.safetensors_io import is_safetensors, load_safetensors, safetensors_bytes
from aia_jax.convert.torch_pickle import CheckpointError
from aia_jax.convert.torch_pickle import load as _load_pickle
from aia_jax.fileio import write_atomically

__all__ = [
    "CheckpointError",
    "ConversionError",
    "batch_counters",
    "describe_checkpoint",
    "describe_torchvision",
    "from_torch",
    "from_torchvision",
    "load_torch_checkpoint",
    "read_checkpoint",
    "save_torch",
    "strip_prefix",
    "to_torch",
]

# The entries of the release's checkpoint wrapper besides `state_dict` and `optimizer`.
WRAPPER_INFO = ("epoch", "arch", "best_prec1")


def load_torch_checkpoint(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The state dict of a checkpoint file as numpy arrays, `module.` prefixes stripped.

    Reads `torch.save` files (the zip format of PyTorch >= 1.6 and the older legacy format)
    without torch and without running pickled code, the release's `{'epoch', 'arch',
    'state_dict', …}` wrapper unwrapped; and `.safetensors` files.

    Raises:
      CheckpointError: missing, truncated or damaged file, or not a checkpoint.
    """
    return read_checkpoint(path)[0]


def read_checkpoint(
    path: str | os.PathLike[str],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Like `load_torch_checkpoint`, also returning the wrapper's `epoch`, `arch`, `best_prec1`.

    Returns:
      `(state_dict, info)`; `info` holds those of the three entries the file has, as plain
      Python values (empty for a bare state dict).
    """
    info: dict[str, Any] = {}
    if is_safetensors(path):
        obj, metadata = load_safetensors(path)
        for key in WRAPPER_INFO:
            if key in metadata:
                info[key] = _from_metadata(metadata[key])
        return _state_dict(path, obj), info
    obj = _load_pickle(path)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        for key in WRAPPER_INFO:
            value = _plain(obj.get(key))
            if value is not None:
                info[key] = value
        obj = obj["state_dict"]
    return _state_dict(path, obj), info


def save_torch(
    state_dict: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    wrap: bool = True,
    epoch: int = 0,
    arch: str | None = None,
    best_prec1: float = 0.0,
) -> None:
    """Writes a state dict as `.safetensors` (always possible) or with `torch.save` (needs torch).

    The file is written whole or not at all (`aia_jax.fileio.write_atomically`).

    Args:
      state_dict: key → array, e.g. from `to_torch` (keys with `module.`, as the release saves).
      path: `*.safetensors` for a safetensors file (the wrapper entries go into its string
        metadata); any other name (`.pth`, `.pth.tar`) is written by `torch.save`.
      wrap: `torch.save` only: wrap as the release's training script does,
        `{'epoch', 'arch', 'state_dict', 'optimizer': None, 'best_prec1'}` (there is no optimizer
        state to write); False writes the bare state dict.
      epoch, best_prec1: the wrapper's entries.
      arch: the wrapper's `arch`; default `resnet<depth>` from the state dict.

    Raises:
      ImportError: a `.pth` file was asked for and torch is not installed.
    """
    name = os.fspath(path)
    if arch is None:
        depth = describe_checkpoint(state_dict)["depth"]
        arch = f"resnet{depth}" if depth else ""
    os.makedirs(os.path.dirname(os.path.abspath(name)), exist_ok=True)
    if name.endswith(".safetensors"):
        data = safetensors_bytes(
            state_dict, {"epoch": epoch, "arch": arch, "best_prec1": float(best_prec1)}
        )
        write_atomically(name, data)
        return
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"writing {name} needs PyTorch (pip install torch); without it write a "
            ".safetensors file instead"
        ) from None
    tensors = OrderedDict(
        (k, torch.from_numpy(np.array(v, copy=True))) for k, v in state_dict.items()
    )
    obj: Any = tensors
    if wrap:
        obj = {
            "epoch": int(epoch),
            "arch": arch,
            "state_dict": tensors,
            "optimizer": None,
            "best_prec1": float(best_prec1),
        }
    # Serialised in memory first so that the file is written whole or not at all (a crash
    # mid-write must not leave a half checkpoint that a later torch.load half reads).
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomically(name, buffer.getvalue())


def _state_dict(path: str | os.PathLike[str], obj: Any) -> dict[str, np.ndarray]:
    """Checks a loaded object is a state dict and strips DataParallel's `module.`."""
    name = os.fspath(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: holds a {type(obj).__name__}, not a state dict")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{name}: state dict key {key!r:.60} is not a string")
        if not isinstance(value, np.ndarray):
            raise CheckpointError(
                f"{name}: state dict entry '{key}' is a {type(value).__name__}, not a tensor"
            )
        short = key.removeprefix("module.")
        if short in out:
            raise CheckpointError(f"{name}: key '{short}' occurs with and without 'module.'")
        out[short] = value
    return out


def _plain(value: Any) -> Any:
    """A wrapper entry as a JSON-friendly Python value, or None."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def _from_metadata(text: str) -> Any:
    import json

    try:
        return _plain(json.loads(text))
    except ValueError:
        return text
