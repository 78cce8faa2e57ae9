"""Read PyTorch checkpoints (``torch.save`` files) without importing torch.

Two formats are read:

- the zip format (PyTorch >= 1.6): a zip archive holding ``<folder>/data.pkl`` (a pickle of the
  saved object), one record ``<folder>/data/<key>`` per tensor storage (raw bytes) and
  ``<folder>/byteorder``;
- the legacy format (PyTorch < 1.6, or ``_use_new_zipfile_serialization=False``; e.g.
  torchvision's 2017 ``resnet50-19c8e357.pth``): a sequence of pickles (magic number, protocol
  version, system info, the saved object, the list of storage keys) followed by each storage
  as an 8-byte little-endian element count and its raw little-endian bytes.

Both pickles refer to storages through ``persistent_load`` and rebuild tensors by calling
``torch._utils._rebuild_tensor_v2`` (or its predecessors); here both are replaced by numpy
equivalents. (The tar format of the earliest PyTorch releases is not read;
``torch.load(weights_only=True)`` refuses it too.)

Unpickling runs code named by the file, so the unpickler only resolves an allow-list of globals
(the tensor rebuild functions, the storage and dtype names, ``OrderedDict`` and a few builtins
that protocol 2 needs to spell bytes and sets, and numpy scalars and arrays of bool, integer,
float and complex dtypes, which `torch.load` with numpy's globals allowed reads too); every other
global, and a numpy object or structured dtype (also one a pickled dtype state would make of a
plain dtype), is refused with :class:`CheckpointError` before anything is called. Tensor views
are bounds-checked against their storage before the strided view is taken so that a crafted
file cannot read outside its buffers.
"""

from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from aia_jax.errors import UserError

__all__ = ["CheckpointError", "load", "load_torch_checkpoint"]


class CheckpointError(UserError):
    """A file is missing, is not a PyTorch checkpoint, is damaged or holds forbidden content."""


class _Refused(pickle.UnpicklingError):
    """Raised inside the unpickler; turned into a CheckpointError naming the file."""


class _Sealed:
    """Immutable holder: no ``__dict__``, and both setattr and ``__setstate__`` refuse.

    A pickle's BUILD opcode calls ``__setstate__`` (or setattr) on whatever object is on the
    stack, including the shared allow-list objects below; refusing it keeps one file from
    changing how later files load. (A frozen dataclass is not enough: its generated
    ``__setstate__`` bypasses the freeze.)
    """

    __slots__ = ()

    def __init__(self, **fields: Any) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise _Refused(f"the pickle tried to set attribute {name!r} of {self!r}")

    def __delattr__(self, name: str) -> None:
        raise _Refused(f"the pickle tried to delete attribute {name!r} of {self!r}")

    def __setstate__(self, state: Any) -> None:
        raise _Refused(f"the pickle tried to modify {self!r} (BUILD)")


class _StorageType(_Sealed):
    """Stand-in for ``torch.<X>Storage``: only carries the element dtype."""

    __slots__ = ("name", "dtype")
    name: str
    dtype: np.dtype

    def __init__(self, name: str, dtype: np.dtype) -> None:
        super().__init__(name=name, dtype=dtype)

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _TorchDtype(_Sealed):
    """Stand-in for a ``torch.<dtype>`` object (used by ``_rebuild_tensor_v3`` and user data)."""

    __slots__ = ("name", "dtype")
    name: str
    dtype: np.dtype

    def __init__(self, name: str, dtype: np.dtype) -> None:
        super().__init__(name=name, dtype=dtype)

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Storage(_Sealed):
    """A storage record read from the archive, as a flat numpy array of its dtype."""

    __slots__ = ("array",)
    array: np.ndarray

    def __init__(self, array: np.ndarray) -> None:
        super().__init__(array=array)

    def __repr__(self) -> str:
        return f"<storage of {self.array.size} {self.array.dtype}>"


class _Callable(_Sealed):
    """An allow-listed function, wrapped so that BUILD cannot set its ``__defaults__`` etc."""

    __slots__ = ("fn",)
    fn: Callable[..., Any]

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__(fn=fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __repr__(self) -> str:
        return f"<allowed {self.fn.__name__}>"


_LEGACY_STORAGES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "ByteStorage": np.dtype(np.uint8),
    "CharStorage": np.dtype(np.int8),
    "ShortStorage": np.dtype(np.int16),
    "IntStorage": np.dtype(np.int32),
    "LongStorage": np.dtype(np.int64),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    # Untyped storages count bytes; typed views come from _rebuild_tensor_v3's dtype argument.
    "UntypedStorage": np.dtype(np.uint8),
}

_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "short": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "cfloat": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "cdouble": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


def _rebuild_tensor(
    storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> np.ndarray:
    """Copy the strided view ``storage[offset + sum(i_k * stride_k)]`` into a new array."""
    if not isinstance(storage, _Storage):
        raise _Refused(f"tensor storage is a {type(storage).__name__}, not a storage record")
    if not isinstance(offset, int) or offset < 0:
        raise _Refused(f"invalid storage offset {offset!r}")
    size = tuple(size)
    stride = tuple(stride)
    if len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in size + stride):
        raise _Refused(f"invalid tensor size {size!r} / stride {stride!r}")
    flat = storage.array
    if 0 in size:
        return np.empty(size, dtype=flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    # A crafted size/stride must not read past the buffer; say so before numpy would.
    if last >= flat.size:
        raise _Refused(
            f"tensor of size {size} stride {stride} offset {offset} exceeds its storage "
            f"of {flat.size} elements"
        )
    # Not `as_strided`: it round-trips the dtype through `__array_interface__`, whose type string
    # numpy cannot parse back for some ml_dtypes (float8_e5m2 is '<f1').
    view = np.ndarray(
        size,
        dtype=flat.dtype,
        buffer=flat,
        offset=offset * flat.itemsize,
        strides=tuple(s * flat.itemsize for s in stride),
    )
    return np.array(view, copy=True, order="C")


def _rebuild_tensor_v2(
    storage: _Storage,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> np.ndarray:
    del requires_grad, backward_hooks, metadata  # training-time state with no numpy meaning
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage: _Storage,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    backward_hooks: Any,
    dtype: _TorchDtype,
    metadata: Any = None,
) -> np.ndarray:
    del requires_grad, backward_hooks, metadata
    if not isinstance(dtype, _TorchDtype):
        raise _Refused(f"invalid tensor dtype {dtype!r}")
    if not isinstance(storage, _Storage):
        raise _Refused(f"tensor storage is a {type(storage).__name__}, not a storage record")
    # v3 tensors sit on an untyped (byte) storage; reinterpret it in the tensor's dtype.
    raw = storage.array.view(np.uint8)
    usable = raw.size - raw.size % dtype.dtype.itemsize
    return _rebuild_tensor(_Storage(raw[:usable].view(dtype.dtype)), storage_offset, size, stride)


def _rebuild_parameter(
    data: np.ndarray, requires_grad: bool = True, backward_hooks: Any = None, state: Any = None
) -> np.ndarray:
    del requires_grad, backward_hooks, state
    if not isinstance(data, np.ndarray):
        raise _Refused(f"parameter data is a {type(data).__name__}, not a tensor")
    return data


def _codecs_encode(obj: str, encoding: str = "utf-8") -> bytes:
    # Protocol 2 spells a bytes object as _codecs.encode(text, 'latin1'); allow only that shape.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise _Refused("_codecs.encode called with unexpected arguments")
    return codecs.encode(obj, encoding)


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


# numpy values of plain (bool, integer, float, complex) dtypes: `best_prec1` saved as a numpy
# float, say, or a numpy array of metrics. Object and structured dtypes are refused: their
# pickles name further globals and run `__setstate__` on arbitrary data.
_NUMPY_KINDS = "biufc"


def _numpy_dtype(name: Any, align: Any = False, copy: Any = True) -> np.dtype:
    try:
        dtype = np.dtype(name) if isinstance(name, str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in _NUMPY_KINDS or align:
        raise _Refused(f"refusing numpy dtype {name!r}: only bool, integer, float, complex")
    del copy  # always a copy: pickle's BUILD then sets its byte order on ours, not numpy's
    return np.dtype(dtype, copy=True)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMPY_KINDS:
        raise _Refused("numpy scalar of a refused dtype")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise _Refused("numpy scalar with malformed data")
    return np.frombuffer(data, dtype)[0]


class _NdarrayName(_Sealed):
    """What the global ``numpy.ndarray`` resolves to: a name for `_numpy_reconstruct`'s argument.

    Not the class itself: a REDUCE would call it, and ``np.ndarray((1,), 'O', data)`` makes an
    object array of whatever pointers ``data`` spells (dereferencing them crashes, or worse).
    """

    __slots__ = ()

    def __call__(self, *args: Any) -> Any:
        raise _Refused(
            "refusing to call 'numpy.ndarray' directly: numpy arrays are read only in the form "
            "numpy pickles them (the pickle may try to build an array from raw pointers)"
        )

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayName()


def _numpy_reconstruct(cls: Any, shape: Any, code: Any) -> np.ndarray:
    # An empty array that pickle's BUILD fills (ndarray.__setstate__ with a dtype from
    # `_numpy_dtype`, hence never an object array).
    if cls is not _NDARRAY:
        raise _Refused("numpy array reconstruction of another class")
    del shape, code
    return np.ndarray((0,), np.uint8)


def _numpy_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    # Protocol 5's form of an array.
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMPY_KINDS:
        raise _Refused("numpy array of a refused dtype")
    if not isinstance(buf, bytes | bytearray) or order not in ("C", "F"):
        raise _Refused("numpy array with malformed data")
    return np.frombuffer(buf, dtype).reshape(_torch_size(shape), order=order).copy(order="K")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    # PyTorch < 0.4 pickled tensors as _rebuild_tensor(storage, offset, size, stride).
    ("torch._utils", "_rebuild_tensor"): _Callable(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Callable(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Callable(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Callable(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Callable(_rebuild_parameter),
    ("torch", "Size"): _Callable(_torch_size),
    ("_codecs", "encode"): _Callable(_codecs_encode),
}
# Protocol 2 names builtins '__builtin__'; the C unpickler maps that only in its own find_class.
for _module in ("builtins", "__builtin__"):
    _ALLOWED[(_module, "set")] = set
    _ALLOWED[(_module, "frozenset")] = frozenset
    _ALLOWED[(_module, "complex")] = complex
# numpy >= 2 pickles under `numpy._core`, older numpy under `numpy.core`.
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "scalar")] = _Callable(_numpy_scalar)
    _ALLOWED[(_module, "_reconstruct")] = _Callable(_numpy_reconstruct)
    _ALLOWED[(_module.replace("multiarray", "numeric"), "_frombuffer")] = _Callable(
        _numpy_frombuffer
    )
_ALLOWED[("numpy", "dtype")] = _Callable(_numpy_dtype)
_ALLOWED[("numpy", "ndarray")] = _NDARRAY
for _name, _dt in _LEGACY_STORAGES.items():
    _ALLOWED[("torch", _name)] = _StorageType(_name, _dt)
_ALLOWED[("torch.storage", "UntypedStorage")] = _ALLOWED[("torch", "UntypedStorage")]
for _name, _dt in _DTYPES.items():
    _ALLOWED[("torch", _name)] = _TorchDtype(_name, _dt)


class _Pending:
    """A tensor in the legacy reader's first pass, which only collects the storage references."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<tensor>"


def _pending(*args: Any) -> _Pending:
    del args
    return _Pending()


# The legacy format stores the tensor bytes after the pickle, so that pickle is read twice: first
# to learn each storage's dtype (hence where the next one starts), with the functions that take or
# return tensors replaced by a placeholder; then for real. Same globals, same refusals.
_FIRST_PASS: dict[tuple[str, str], Any] = dict(_ALLOWED)
for _key in _ALLOWED:
    if _key[0] == "torch._utils":
        _FIRST_PASS[_key] = _Callable(_pending)

# (key, storage type, numel, view) -> storage; view is None or (view key, offset, numel).
_StorageReader = Callable[[str, _StorageType, int, Any], Any]


def _check_dtype_state(dtype: np.dtype, state: Any) -> None:
    """Refuses a BUILD of a numpy dtype other than a plain dtype's (optionally a byte order).

    numpy pickles a dtype as ``numpy.dtype('f8', False, True)`` then BUILD with its state; that
    state can also give the dtype fields, a subarray or object flags without changing its kind,
    and numpy then trusts the result: a float dtype given a subarray of 10**8 elements keeps
    its 8-byte item size, so ``np.frombuffer`` of 8 bytes reads far past them (a crash).
    """
    plain = dtype.__reduce__()[2]  # the dtype is still plain: every earlier BUILD was checked
    if not (
        isinstance(state, tuple)
        and len(state) == len(plain)
        and state[0] == plain[0]
        and state[1] in ("<", ">", "|", "=")
        and state[2:] == plain[2:]
    ):
        raise _Refused(
            f"refusing numpy dtype state {state!r:.80} for {dtype}: only the byte order of a "
            "plain bool, integer, float or complex dtype may be set"
        )


def _load_build(unpickler: pickle._Unpickler) -> None:
    """The BUILD opcode, with the state of a numpy dtype checked first."""
    stack = unpickler.stack
    if len(stack) >= 2 and isinstance(stack[-2], np.dtype):
        _check_dtype_state(stack[-2], stack[-1])
    pickle._Unpickler.load_build(unpickler)


class _StrictReader:
    """A binary stream whose short reads raise, as the C unpickler's do.

    The pure-Python unpickler takes what a short read returns: a truncated pickle then fails
    on a partial global name ("refusing to load global 'torch.'") or a short number.
    """

    def __init__(self, stream: io.BytesIO) -> None:
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if size > 0 and len(data) < size:
            raise pickle.UnpicklingError("pickle data was truncated")
        return data

    def readline(self) -> bytes:
        line = self._stream.readline()
        if not line.endswith(b"\n"):
            raise pickle.UnpicklingError("pickle data was truncated")
        return line


# The pure-Python unpickler, because the C one offers no hook into BUILD (see _load_build); it
# costs about 0.1 s on a ResNet-101 checkpoint, whose tensor bytes are not in the pickle.
class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that resolves only allow-listed globals and reads storages through a callback.

    ``pid_len`` is the length of a storage's persistent id: 5 in the zip format,
    ``('storage', type, key, location, numel)``; 6 in the legacy format, which appends the view
    (None, or ``(view key, offset, numel)``); 0 refuses every persistent id.
    """

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: _load_build}

    def __init__(
        self,
        file: io.BytesIO,
        read_storage: _StorageReader | None,
        *,
        pid_len: int = 5,
        allowed: dict[tuple[str, str], Any] = _ALLOWED,
    ) -> None:
        # Python 2 pickles (old legacy files) spell text as byte strings; torch.load decodes UTF-8.
        super().__init__(_StrictReader(file), encoding="utf-8")
        self._read_storage = read_storage
        self._pid_len = pid_len
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _Refused(
                f"refusing to load global '{module}.{name}': only tensors and plain containers "
                "are allowed (the pickle may try to run code)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not (
            self._read_storage is not None
            and isinstance(pid, tuple)
            and len(pid) == self._pid_len
            and pid[0] == "storage"
        ):
            raise _Refused(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, _StorageType):
            raise _Refused(f"persistent id names {storage_type!r:.80}, not a storage type")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise _Refused(f"invalid storage record reference {pid!r:.80}")
        if view is not None and not (
            isinstance(view, tuple)
            and len(view) == 3
            and isinstance(view[0], str)
            and all(isinstance(v, int) and v >= 0 for v in view[1:])
        ):
            raise _Refused(f"invalid storage view {view!r:.80}")
        return self._read_storage(key, storage_type, numel, view)


def _fail(path: str | os.PathLike[str], what: str) -> CheckpointError:
    return CheckpointError(f"{os.fspath(path)}: {what}")


# torch.save's legacy format starts with this number pickled (protocol 2 unless the caller
# chose another; protocols 0 and 1 spell it as text).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_LEGACY_TEXT_MAGIC = b"L%dL\n." % _LEGACY_MAGIC


def load(path: str | os.PathLike[str]) -> Any:
    """Unpickles a ``torch.save`` checkpoint with every tensor as a numpy array.

    Args:
      path: file written by ``torch.save``, in the zip format (PyTorch >= 1.6) or the legacy
        one (PyTorch < 1.6, or ``_use_new_zipfile_serialization=False``).

    Returns:
      The saved object: dicts, lists, tuples, numbers and strings as saved, tensors and
      parameters as C-contiguous numpy arrays of the matching dtype (bfloat16 and float8 via
      ml_dtypes), ``torch.<dtype>`` objects as opaque stand-ins.

    Raises:
      CheckpointError: the file is missing, is not a checkpoint, is truncated or damaged, or
        its pickle names a global outside the allow-list.
    """
    if not os.path.exists(path):
        raise _fail(path, "no such file")
    if os.path.isdir(path):
        raise _fail(path, "is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            # A zip archive starts with 'PK'; only a pickle starts with PROTO (0x80).
            legacy = _is_legacy(f.read(len(_LEGACY_TEXT_MAGIC)))
            if legacy:
                f.seek(0)
                data = f.read()
    except OSError as e:
        raise _fail(path, f"cannot read ({e})") from None
    if legacy:
        return _guarded(path, _load_legacy, data)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, NotImplementedError):
        # NotImplementedError: a damaged directory entry claiming a newer zip version.
        raise _not_a_zip(path) from None
    except OSError as e:
        raise _fail(path, f"cannot read ({e})") from None
    with zf:
        return _guarded(path, _load_from_zip, zf)


def _is_legacy(head: bytes) -> bool:
    return head[:1] == b"\x80" or head == _LEGACY_TEXT_MAGIC


def _guarded(path: str | os.PathLike[str], read: Callable[[Any], Any], source: Any) -> Any:
    """``read(source)``, any failure inside it turned into a one-line CheckpointError."""
    try:
        return read(source)
    except _Refused as e:
        raise _fail(path, str(e)) from None
    except Exception as e:  # noqa: BLE001 - any failure inside a crafted pickle is "damaged"
        raise _fail(path, f"damaged checkpoint ({type(e).__name__}: {e})") from None


def _not_a_zip(path: str | os.PathLike[str]) -> CheckpointError:
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return _fail(path, f"cannot read ({e})")
    if head.startswith(b"PK"):
        return _fail(path, "damaged zip archive (truncated file?)")
    if head[257:262] == b"ustar":
        return _fail(
            path,
            "a tar archive: the tar format of the earliest PyTorch releases is not supported "
            "(torch.load(weights_only=True) refuses it too; re-save it with a newer torch.save)",
        )
    return _fail(path, "not a PyTorch checkpoint (neither a zip archive nor a legacy pickle)")


def _load_from_zip(zf: zipfile.ZipFile) -> Any:
    names = zf.namelist()
    # The top-level folder is named after the file at save time, so any folder is accepted.
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise _Refused(
            "not a PyTorch checkpoint: expected one '<folder>/data.pkl' record, "
            f"found {len(pickles)}"
        )
    prefix = pickles[0][: -len("data.pkl")]

    def read(name: str) -> bytes:
        try:
            return zf.read(name)
        except KeyError:
            raise _Refused(f"record '{name}' is missing (truncated file?)") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise _Refused(f"record '{name}' is damaged ({e})") from None

    byteorder = "little"  # files from before the byteorder record were all little-endian
    if prefix + "byteorder" in names:
        byteorder = read(prefix + "byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise _Refused(f"unknown byteorder record {byteorder!r:.40}")
    order = "<" if byteorder == "little" else ">"
    cache: dict[str, np.ndarray] = {}

    def read_storage(key: str, storage_type: _StorageType, numel: int, view: Any) -> _Storage:
        del view  # the zip format has none
        if key not in cache:
            # One record per storage: tensors sharing it must also share the bytes read.
            cache[key] = np.frombuffer(read(f"{prefix}data/{key}"), dtype=np.uint8)
        what = f"storage record '{prefix}data/{key}'"
        return _typed(cache[key], storage_type, numel, order, what)

    return _RestrictedUnpickler(io.BytesIO(read(prefix + "data.pkl")), read_storage).load()


def _typed(
    raw: np.ndarray, storage_type: _StorageType, numel: int, order: str, what: str
) -> _Storage:
    """The first ``numel`` elements of the bytes ``raw`` in the storage's dtype, native order."""
    dtype = storage_type.dtype.newbyteorder(order)
    nbytes = numel * dtype.itemsize
    if raw.size < nbytes:
        raise _Refused(f"{what} holds {raw.size} bytes, {nbytes} expected (truncated file?)")
    arr = raw[:nbytes].view(dtype)
    if not arr.dtype.isnative:
        arr = arr.astype(dtype.newbyteorder("="))
    return _Storage(arr)


def _load_legacy(data: bytes) -> Any:
    """Reads the legacy (pre-zip) format; see the module docstring for the layout."""
    stream = io.BytesIO(data)

    def unpickle(what: str, unpickler: _RestrictedUnpickler) -> Any:
        try:
            return unpickler.load()
        except _Refused:
            raise
        except (EOFError, pickle.UnpicklingError) as e:
            if stream.tell() >= len(data) or "truncated" in str(e):
                raise _Refused(f"the {what} ends early (truncated file?)") from None
            raise _Refused(f"the {what} is damaged ({type(e).__name__}: {e})") from None

    def header(what: str) -> Any:
        return unpickle(what, _RestrictedUnpickler(stream, None, pid_len=0))

    magic = header("header")
    if type(magic) is not int or magic != _LEGACY_MAGIC:
        raise _Refused(
            "not a PyTorch checkpoint: a pickle, but without torch.save's legacy-format magic "
            "number"
        )
    version = header("header")
    if type(version) is not int or version != _LEGACY_PROTOCOL:
        raise _Refused(f"unsupported legacy format version {version!r:.40} (expected 1001)")
    if not isinstance(header("header"), dict):  # sys_info: byte order, C type sizes
        raise _Refused("damaged header: the system info is not a dict")
    start = stream.tell()

    # Pass 1: which storages the object references, in which dtype (the first reference's, as
    # torch.load does) and how many elements; the first reference to a key fixes them.
    first: dict[str, tuple[_StorageType, int]] = {}

    def note(key: str, storage_type: _StorageType, numel: int, view: Any) -> None:
        del view
        first.setdefault(key, (storage_type, numel))

    unpickle(
        "object pickle",
        _RestrictedUnpickler(stream, note, pid_len=6, allowed=_FIRST_PASS),
    )
    keys = header("storage key list")
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise _Refused("damaged storage key list (not a list of strings)")

    # The storages follow in the order of the list: int64 element count, then the bytes.
    records: dict[str, np.ndarray] = {}
    pos = stream.tell()
    for key in keys:
        if key in records:
            raise _Refused(f"storage '{key:.40}' is listed twice")
        if key not in first:
            raise _Refused(f"storage '{key:.40}' is listed but no tensor uses it")
        storage_type, numel = first[key]
        if pos + 8 > len(data):
            raise _Refused(f"storage '{key:.40}' is missing (truncated file?)")
        count = int.from_bytes(data[pos : pos + 8], "little", signed=True)
        if count != numel:
            raise _Refused(f"storage '{key:.40}' holds {count} elements, {numel} expected")
        pos += 8
        nbytes = numel * storage_type.dtype.itemsize
        if pos + nbytes > len(data):
            raise _Refused(
                f"storage '{key:.40}' holds {len(data) - pos} bytes, {nbytes} expected "
                "(truncated file?)"
            )
        records[key] = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=pos)
        pos += nbytes
    for key in first:
        if key not in records:
            raise _Refused(f"storage '{key:.40}' is missing from the file (truncated file?)")

    # Pass 2: the object, with the tensors read from the records (always little-endian).
    def read_storage(
        key: str, storage_type: _StorageType, numel: int, view: tuple[str, int, int] | None
    ) -> _Storage:
        if key not in records:  # pass 1 saw the same references; a guard, not expected
            raise _Refused(f"storage '{key:.40}' is missing from the file")
        storage = _typed(records[key], storage_type, numel, "<", f"storage '{key:.40}'")
        if view is None:
            return storage
        # Views (PyTorch < 0.4) are a slice of their root storage, in elements.
        _, offset, size = view
        if offset + size > storage.array.size:
            raise _Refused(
                f"storage view {view!r:.80} exceeds its storage of {storage.array.size} elements"
            )
        return _Storage(storage.array[offset : offset + size])

    stream.seek(start)
    return unpickle("object pickle", _RestrictedUnpickler(stream, read_storage, pid_len=6))


def load_torch_checkpoint(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Loads the state dict of a PyTorch checkpoint as numpy arrays, without torch.

    The release wraps the state dict as ``{'epoch', 'arch', 'state_dict', 'optimizer',
    'best_prec1'}``; only the ``'state_dict'`` entry is unwrapped (a bare state dict is taken as
    is). A leading ``module.`` (from ``torch.nn.DataParallel``) is stripped from every key.

    Args:
      path: file written by ``torch.save``.

    Returns:
      Ordered ``{key: array}`` in the file's order.

    Raises:
      CheckpointError: as :func:`load`, or when the state dict is not a dict of tensors.
    """
    obj = load(path)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise _fail(path, f"holds a {type(obj).__name__}, not a state dict")
    out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for key, value in obj.items():
        if not isinstance(key, str):
            raise _fail(path, f"state dict key {key!r} is not a string")
        if not isinstance(value, np.ndarray):
            raise _fail(path, f"state dict entry '{key}' is a {type(value).__name__}, not a tensor")
        name = key.removeprefix("module.")
        if name in out:
            raise _fail(path, f"state dict key '{name}' occurs with and without 'module.'")
        out[name] = value
    return out
