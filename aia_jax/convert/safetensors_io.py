"""`.safetensors` files of state dicts through the `safetensors` package's numpy API (no torch).

A `.safetensors` file is an 8-byte little-endian header length, a JSON header (dtype, shape and
byte range of every tensor, plus optional string metadata) and the raw tensor bytes; nothing in
it is executed on loading, and torch's `safetensors.torch.load_file` reads the same file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from aia_jax.convert.torch_pickle import CheckpointError
from aia_jax.fileio import write_atomically

SUFFIX = ".safetensors"


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is named `*.safetensors` or starts like one (length, then a JSON object)."""
    if os.fspath(path).endswith(SUFFIX):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + length <= size


def safetensors_bytes(
    state_dict: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
) -> bytes:
    """The `.safetensors` file of `state_dict` (numpy-convertible values), as bytes.

    Metadata values become strings (JSON unless already a string).
    """
    from safetensors.numpy import save

    # Not `np.ascontiguousarray`: it turns the 0-d `num_batches_tracked` counters into shape (1,).
    tensors = {k: np.require(np.asarray(v), requirements="C") for k, v in state_dict.items()}
    meta = {"format": "pt"}  # what `safetensors.torch` writes; some readers insist on it
    for key, value in (metadata or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return save(tensors, metadata=meta)


def save_safetensors(
    state_dict: Mapping[str, Any],
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Writes `state_dict` to `path` whole or not at all; metadata values become strings."""
    write_atomically(os.fspath(path), safetensors_bytes(state_dict, metadata))


def load_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads a `.safetensors` file into `({key: array}, metadata)`.

    Raises:
      CheckpointError: the file is missing, truncated or not a safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    name = os.fspath(path)
    if not os.path.isfile(name):
        what = "is a directory, not a checkpoint file" if os.path.isdir(name) else "no such file"
        raise CheckpointError(f"{name}: {what}")
    try:
        with safe_open(name, framework="np") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: _tensor(name, f, key) for key in f.keys()}
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{name}: not a readable safetensors file ({detail})") from None
    return tensors, metadata


def _tensor(name: str, f: Any, key: str) -> np.ndarray:
    """Tensor `key` of the open file `f`, or a CheckpointError naming it and its dtype."""
    try:
        return f.get_tensor(key)
    except (AttributeError, KeyError, TypeError) as e:
        # safetensors' numpy reader lacks some dtypes (the float8 ones) and fails on them with
        # an AttributeError of its own, not a SafetensorError.
        dtype = f.get_slice(key).get_dtype()
        raise CheckpointError(
            f"{name}: tensor '{key}' has dtype {dtype}, which numpy cannot read ({e})"
        ) from None
