"""The torch-free checkpoint reader against ``torch.load(weights_only=True)`` on real files."""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from aia_jax import convert
from aia_jax.convert.torch_pickle import CheckpointError, load, load_torch_checkpoint

REPO = Path(__file__).resolve().parents[1]

NUMPY_OF = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.bfloat16: ml_dtypes.bfloat16,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.uint8: np.uint8,
    torch.uint16: np.uint16,
    torch.bool: np.bool_,
    torch.complex64: np.complex64,
}


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.uint16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _assert_same(expected: Any, got: Any, where: str = "") -> None:
    """Recursively compares a torch.load result with a torch_pickle.load result."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, np.ndarray), where
        assert got.dtype == np.dtype(NUMPY_OF[expected.dtype]), where
        assert got.shape == tuple(expected.shape), where
        want = _as_numpy(expected)
        assert got.tobytes() == want.tobytes(), where  # bit-exact, NaNs included
    elif isinstance(expected, dict):
        assert type(got) is type(expected), where
        assert list(got) == list(expected), where
        for k in expected:
            _assert_same(expected[k], got[k], f"{where}/{k}")
    elif isinstance(expected, (list, tuple)):
        assert type(got) is type(expected) and len(got) == len(expected), where
        for i, (e, g) in enumerate(zip(expected, got)):
            _assert_same(e, g, f"{where}[{i}]")
    elif isinstance(expected, torch.dtype):
        assert repr(got) == str(expected), where
    else:
        assert type(got) is type(expected) and got == expected, where


def _roundtrip(obj: Any, path: Path) -> tuple[Any, Any]:
    torch.save(obj, path)
    return torch.load(path, weights_only=True), load(path)


def test_dtypes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    obj = {
        "f32": x,
        "f64": x.double(),
        "f16": x.half(),
        "bf16": x.bfloat16(),
        "i8": (x * 50).to(torch.int8),
        "i16": (x * 1000).to(torch.int16),
        "i32": (x * 1e6).to(torch.int32),
        "i64": torch.tensor([-(2**62), 0, 2**62 + 7]),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "u16": torch.arange(65530, 65536, dtype=torch.int32).to(torch.uint16),
        "bool": x > 0,
        "c64": torch.complex(x, -x),
        "scalar": torch.tensor(3.5),
        "scalar_long": torch.tensor(7),
        "empty": torch.zeros(0, 4),
        "nan": torch.tensor([float("nan"), float("inf"), -0.0]),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }
    expected, got = _roundtrip(obj, tmp_path / "dtypes.pth")
    _assert_same(expected, got)
    assert got["scalar"].shape == () and got["empty"].shape == (0, 4)


def test_float8_tensors(tmp_path: Path) -> None:
    # torch saves float8 tensors as byte storages with _rebuild_tensor_v3; float8_e5m2 once
    # failed as 'damaged' (numpy cannot parse its array-interface type string '<f1').
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    obj = {"e4m3": x.to(torch.float8_e4m3fn), "e5m2": x.to(torch.float8_e5m2).t()}
    path = tmp_path / "f8.pth"
    torch.save(obj, path)
    got = load(path)
    for key, dtype in (("e4m3", ml_dtypes.float8_e4m3fn), ("e5m2", ml_dtypes.float8_e5m2)):
        want = obj[key].contiguous().view(torch.uint8).numpy()
        assert got[key].dtype == np.dtype(dtype) and got[key].shape == tuple(obj[key].shape)
        assert got[key].view(np.uint8).tobytes() == want.tobytes(), key


def test_shared_storage_and_views(tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    obj = {
        "base": base,
        "t": base.t(),
        "slice": base[2:5, 3:9],
        "step": base[1::2, ::3],
        "flat_offset": base.view(-1)[17:41],
        "row": base[4],
        "col": base[:, 7],
        "expand": base[0, :3].unsqueeze(0).expand(4, 3),  # stride 0
        "permuted": base.view(2, 3, 10).permute(2, 0, 1),
        "same_again": base,
    }
    path = tmp_path / "views.pth"
    expected, got = _roundtrip(obj, path)
    _assert_same(expected, got)
    storages = [n for n in zipfile.ZipFile(path).namelist() if "/data/" in n]
    assert len(storages) == 1  # every tensor above really is a view of one storage


def test_nested_containers(tmp_path: Path) -> None:
    obj = collections.OrderedDict(
        a=[1, 2.5, "three", None, True, (torch.ones(2), {"deep": torch.arange(3)})],
        b=("x", -4, 1e300, float("inf")),
        c=collections.OrderedDict(z=torch.zeros(1, dtype=torch.int16), y="s"),
        d={1: "int key", (2, 3): "tuple key"},
        e=b"raw bytes",
        f=torch.float16,
        g=[],
        h={},
    )
    expected, got = _roundtrip(obj, tmp_path / "nested.pth")
    _assert_same(expected, got)


def _release_checkpoint(
    path: Path, *, legacy: bool = False
) -> collections.OrderedDict[str, torch.Tensor]:
    from tests import torch_reference as R

    net = R.randomize_(R.build("TSM_CinST_BN", 5, num_segments=2, depth=14, width=8), seed=4)
    model = torch.nn.DataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    model(torch.randn(1, 2, 3, 32, 32)).sum().backward()
    opt.step()
    state_dict = model.state_dict()
    torch.save(
        {
            "epoch": 12,
            "arch": "resnet14",
            "state_dict": state_dict,
            "optimizer": opt.state_dict(),
            "best_prec1": 41.25,
        },
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    return state_dict


def test_release_wrapper(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth.tar"
    state_dict = _release_checkpoint(path)
    _assert_same(torch.load(path, weights_only=True), load(path))
    got = load_torch_checkpoint(path)
    assert list(got) == [k.removeprefix("module.") for k in state_dict]
    assert all(k.startswith("module.") for k in state_dict)
    for k, v in state_dict.items():
        _assert_same(v, got[k.removeprefix("module.")], k)
    assert got["base_model.bn1.num_batches_tracked"].dtype == np.int64


def test_bare_state_dict(tmp_path: Path) -> None:
    sd = collections.OrderedDict([("module.a", torch.ones(2)), ("b", torch.zeros(3, 1))])
    torch.save(sd, tmp_path / "sd.pth")
    got = load_torch_checkpoint(tmp_path / "sd.pth")
    assert list(got) == ["a", "b"] and got["b"].shape == (3, 1)


def _rewrite_zip(src: Path, dst: Path, edit: Any) -> None:
    """Copies a zip, letting ``edit(name, data)`` return new (name, data), or None to drop."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            out = edit(info.filename, zin.read(info.filename))
            if out is not None:
                zout.writestr(out[0], out[1])


def test_any_folder_name_and_big_endian(tmp_path: Path) -> None:
    x = torch.randn(4, 3).double()
    src = tmp_path / "src.pth"
    torch.save({"x": x, "i": torch.arange(5)}, src)
    folder = zipfile.ZipFile(src).namelist()[0].split("/")[0]

    def renamed(name: str, data: bytes) -> tuple[str, bytes]:
        return "some other folder/" + name.split("/", 1)[1], data

    _rewrite_zip(src, tmp_path / "renamed.pth", renamed)
    _assert_same(torch.load(src, weights_only=True), load(tmp_path / "renamed.pth"))

    storages = load(src)  # record key -> dtype, to byte-swap each storage in place

    def big(name: str, data: bytes) -> tuple[str, bytes]:
        if name == f"{folder}/byteorder":
            return name, b"big"
        if name.startswith(f"{folder}/data/"):
            itemsize = 8  # both tensors above have 8-byte elements
            return name, np.frombuffer(data, f"<u{itemsize}").astype(f">u{itemsize}").tobytes()
        return name, data

    _rewrite_zip(src, tmp_path / "big.pth", big)
    got = load(tmp_path / "big.pth")
    np.testing.assert_array_equal(got["x"], storages["x"])
    np.testing.assert_array_equal(got["i"], storages["i"])
    assert got["x"].dtype == np.float64 and got["x"].dtype.isnative


MARKER_NAME = "pwned.txt"


def _make_marker(path: str) -> None:
    Path(path).write_text("the pickle ran code")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_make_marker, (self.marker,))


class _EvilSystem:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (f"touch '{self.marker}'",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / MARKER_NAME
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match=r"_make_marker") as err:
        load(path)
    assert "refusing" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(CheckpointError):
        load_torch_checkpoint(path)
    assert not marker.exists()

    # The same payload as the only content of an otherwise well-formed archive.
    path2 = tmp_path / "evil2.pth"
    with zipfile.ZipFile(path2, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(_EvilSystem(marker), protocol=2))
        zf.writestr("archive/byteorder", b"little")
        zf.writestr("archive/version", b"3\n")
    with pytest.raises(CheckpointError, match=r"posix\.system|os\.system|nt\.system"):
        load(path2)
    assert not marker.exists()


def test_pickle_cannot_mutate_the_allow_list(tmp_path: Path) -> None:
    # GLOBAL _rebuild_tensor_v2, then BUILD with slot state {'fn': 1}: must fail, not stick.
    payload = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x02\x00\x00\x00fnK\x01s\x86b."
    bad = tmp_path / "mutate.pth"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
    with pytest.raises(CheckpointError):
        load(bad)
    good = tmp_path / "good.pth"
    torch.save({"x": torch.arange(4)}, good)
    np.testing.assert_array_equal(load(good)["x"], np.arange(4))


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load(tmp_path / "missing.pth")
    assert issubclass(CheckpointError, ValueError)

    text = tmp_path / "notes.txt"
    text.write_text("hello, not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_torch_checkpoint(text)

    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(64, 64), "v": torch.randn(8)}, good)
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        truncated = tmp_path / f"truncated_{cut}.pth"
        truncated.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=str(truncated.name)):
            load_torch_checkpoint(truncated)

    no_storage = tmp_path / "no_storage.pth"
    _rewrite_zip(good, no_storage, lambda n, d: None if n.endswith("/data/0") else (n, d))
    with pytest.raises(CheckpointError, match="missing"):
        load(no_storage)

    short_storage = tmp_path / "short_storage.pth"
    _rewrite_zip(good, short_storage, lambda n, d: (n, d[:16] if n.endswith("/data/0") else d))
    with pytest.raises(CheckpointError, match="truncated"):
        load(short_storage)

    no_pickle = tmp_path / "no_pickle.zip"
    with zipfile.ZipFile(no_pickle, "w") as zf:
        zf.writestr("folder/readme.txt", "just a zip")
    with pytest.raises(CheckpointError, match="data.pkl"):
        load(no_pickle)

    plain = tmp_path / "plain.pkl"  # a pickle, but not torch.save's
    plain.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    with pytest.raises(CheckpointError, match="magic number"):
        load(plain)

    tar = tmp_path / "old.tar"  # the earliest torch.save format was a tar archive
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo("pickle")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(CheckpointError, match="tar"):
        load(tar)

    with pytest.raises(CheckpointError, match="directory"):
        load(tmp_path)


def test_damaged_zip_directory_entry(tmp_path: Path) -> None:
    # A flipped byte in a directory entry's "version needed to extract" made zipfile raise
    # NotImplementedError, which escaped as a traceback.
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(3)}, good)
    data = bytearray(good.read_bytes())
    entry = data.index(b"PK\x01\x02")
    data[entry + 6] = 0xFF
    bad = tmp_path / "bad_version.pth"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"bad_version.pth: damaged zip archive"):
        load_torch_checkpoint(bad)


def test_non_tensor_state_dict_entry(tmp_path: Path) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"state_dict": {"module.w": torch.ones(1), "module.step": 3}}, path)
    with pytest.raises(CheckpointError, match="'module.step' is a int"):
        load_torch_checkpoint(path)
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_torch_checkpoint(path)


@pytest.mark.parametrize("legacy", [False, True])
def test_numpy_values_in_the_wrapper(tmp_path: Path, legacy: bool) -> None:
    """A wrapper with numpy metrics (`best_prec1` as np.float64, an array of per-class
    accuracies) reads like torch.load with numpy's globals allowed; object arrays do not."""
    path = tmp_path / "ckpt.pth.tar"
    accuracies = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3) / 7)
    obj = {
        "epoch": np.int64(12),
        "state_dict": {"module.w": torch.ones(2)},
        "best_prec1": np.float64(41.25),
        "per_class": accuracies,
        "seen": np.bool_(True),
    }
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    got = load(path)
    for key in ("epoch", "best_prec1", "seen"):
        assert type(got[key]) is type(obj[key]) and got[key] == obj[key], key
    assert got["per_class"].dtype == np.float32
    np.testing.assert_array_equal(got["per_class"], accuracies)
    state_dict, info = convert.read_checkpoint(path)
    assert info == {"epoch": 12, "best_prec1": 41.25}
    assert type(info["epoch"]) is int and type(info["best_prec1"]) is float
    np.testing.assert_array_equal(state_dict["w"], np.ones(2, np.float32))

    evil = tmp_path / "objects.pth"
    torch.save({"state_dict": {}, "x": np.array([_Evil(tmp_path / MARKER_NAME)], object)}, evil)
    with pytest.raises(CheckpointError, match="refusing numpy dtype 'O8'"):
        load(evil)
    assert not (tmp_path / MARKER_NAME).exists()


class _NdarrayCall:
    """Pickles as a direct call of the class ``numpy.ndarray`` with the given arguments."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __reduce__(self) -> tuple[Any, ...]:
        return (np.ndarray, self.args)


@pytest.mark.parametrize(
    "args",
    # With raw pointer bytes, ('O', b'\xef\xbe\xad\xde...') crashed the loader (segmentation
    # fault); these two are the harmless forms of the same call, read before the fix.
    [((2,), "f8", b"\0" * 16), ((1,), "O")],
    ids=["float_from_bytes", "object_array"],
)
def test_numpy_ndarray_cannot_be_called(tmp_path: Path, args: Any) -> None:
    path = tmp_path / "ndarray.pth"
    payload = pickle.dumps({"state_dict": {}, "best_prec1": _NdarrayCall(*args)}, protocol=2)
    assert b"numpy\nndarray" in payload
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
    with pytest.raises(CheckpointError, match=r"ndarray.pth: refusing to call 'numpy.ndarray'"):
        load(path)


class _DtypeWithState:
    """Pickles as numpy pickles a float64 dtype, with a crafted BUILD state."""

    def __init__(self, state: tuple[Any, ...]) -> None:
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        return (np.dtype, ("f8", False, True), self.state)


class _ArrayOf:
    """Pickles as protocol 5's numpy array form, ``_frombuffer(bytes, dtype, shape, order)``."""

    def __init__(self, dtype: Any, shape: tuple[int, ...]) -> None:
        self.dtype, self.shape = dtype, shape

    def __reduce__(self) -> tuple[Any, ...]:
        from numpy._core.numeric import _frombuffer

        return (_frombuffer, (b"\0" * 8, self.dtype, self.shape, "C"))


@pytest.mark.parametrize(
    "state, shape",
    [
        # A subarray of N float32 leaves the item size at 8: with N = 10**8, np.frombuffer of
        # 8 bytes read 400 MB past them and the loader crashed (segmentation fault).
        ((3, "<", (np.dtype("f4"), (2,)), None, None, -1, -1, 0), (1, 2)),
        ((3, "<", None, ("a",), {"a": (np.dtype("f4"), 0)}, 8, 1, 0), (1,)),
        ((3, "<", None, None, None, -1, -1, 0x3F), (1,)),  # object flags on a float dtype
    ],
    ids=["subarray", "fields", "object_flags"],
)
def test_pickled_numpy_dtype_state_is_checked(tmp_path: Path, state: Any, shape: Any) -> None:
    path = tmp_path / "dtype.pth"
    payload = pickle.dumps({"best_prec1": _ArrayOf(_DtypeWithState(state), shape)}, protocol=2)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
    with pytest.raises(CheckpointError, match=r"dtype.pth: refusing numpy dtype state"):
        load(path)
    # A plain state, in either byte order, is what numpy writes and still reads.
    for order in "<>":
        plain = (3, order, None, None, None, -1, -1, 0)
        payload = pickle.dumps({"x": _ArrayOf(_DtypeWithState(plain), (1,))}, protocol=2)
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", payload)
        assert load(path)["x"].dtype == np.dtype(f"{order}f8")


# ---------------------------------------------------------------- legacy (pre-1.6) format


def _save_legacy(obj: Any, path: Path, **kwargs: Any) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=False, **kwargs)
    assert not zipfile.is_zipfile(path)
    return path


def _legacy_roundtrip(obj: Any, path: Path, **kwargs: Any) -> tuple[Any, Any]:
    _save_legacy(obj, path, **kwargs)
    # torch's weights-only unpickler knows protocol 2 only; these files are the test's own.
    weights_only = kwargs.get("pickle_protocol", 2) == 2
    return torch.load(path, weights_only=weights_only), load(path)


def _legacy_layout(path: Path) -> tuple[int, int, int, list[str]]:
    """Where a legacy file's header, object pickle and key list end; the storage keys.

    Parsed with ``pickletools.genops``, which builds no objects, and plain ``pickle`` for the
    header and key list, which hold only numbers, strings and dicts.
    """
    f = io.BytesIO(path.read_bytes())
    for _ in range(3):  # magic number, format version, system info
        pickle.load(f)
    header_end = f.tell()
    for _ in pickletools.genops(f):  # stops after the object pickle's STOP
        pass
    pickle_end = f.tell()
    keys = pickle.load(f)
    return header_end, pickle_end, f.tell(), keys


@pytest.mark.parametrize("protocol", [1, 2, 5])
def test_legacy_dtypes(tmp_path: Path, protocol: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, generator=g)
    obj = {
        "f32": x,
        "f64": x.double(),
        "f16": x.half(),
        "bf16": x.bfloat16(),
        "i8": (x * 50).to(torch.int8),
        "i16": (x * 1000).to(torch.int16),
        "i32": (x * 1e6).to(torch.int32),
        "i64": torch.tensor([-(2**62), 0, 2**62 + 7]),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": x > 0,
        "c64": torch.complex(x, -x),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "nan": torch.tensor([float("nan"), float("inf"), -0.0]),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }
    path = tmp_path / f"dtypes-{protocol}.pth"
    expected, got = _legacy_roundtrip(obj, path, pickle_protocol=protocol)
    _assert_same(expected, got)
    assert got["bf16"].dtype == ml_dtypes.bfloat16 and got["empty"].shape == (0, 4)
    assert len(_legacy_layout(path)[3]) == len(obj)


def test_legacy_shared_storage_and_views(tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    other = torch.arange(12, dtype=torch.int64)
    obj = {
        "base": base,
        "t": base.t(),
        "slice": base[2:5, 3:9],
        "step": base[1::2, ::3],
        "flat_offset": base.view(-1)[17:41],
        "col": base[:, 7],
        "expand": base[0, :3].unsqueeze(0).expand(4, 3),  # stride 0
        "permuted": base.view(2, 3, 10).permute(2, 0, 1),
        "same_again": base,
        "other": [other[5:], other.view(3, 4)[:, 1], other],
    }
    path = tmp_path / "views.pth"
    expected, got = _legacy_roundtrip(obj, path)
    _assert_same(expected, got)
    assert len(_legacy_layout(path)[3]) == 2  # two storages, each written once


def test_legacy_torchvision_state_dict(tmp_path: Path) -> None:
    from tests import torch_reference as R

    tv = R.randomize_(R.TorchvisionResNet(14, width=8), seed=3)
    state_dict = tv.state_dict()  # an OrderedDict with a _metadata attribute, as torchvision's
    path = _save_legacy(state_dict, tmp_path / "resnet14-legacy.pth")
    _assert_same(torch.load(path, weights_only=True), load(path))
    for loaded in (load_torch_checkpoint(path), convert.load_torch_checkpoint(path)):
        assert list(loaded) == list(state_dict)
        for k, v in state_dict.items():
            _assert_same(v, loaded[k], k)
    assert convert.describe_torchvision(load_torch_checkpoint(path))["width"] == 8

    nested = {"model": {"backbone": state_dict, "names": ["conv1", "fc"]}, "step": (3, 4.5)}
    expected, got = _legacy_roundtrip(nested, tmp_path / "nested.pth")
    _assert_same(expected, got)


def test_legacy_release_wrapper(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth.tar"
    state_dict = _release_checkpoint(path, legacy=True)
    assert not zipfile.is_zipfile(path)
    _assert_same(torch.load(path, weights_only=True), load(path))  # optimizer state included
    got, info = convert.read_checkpoint(path)
    assert info == {"epoch": 12, "arch": "resnet14", "best_prec1": 41.25}
    assert list(got) == [k.removeprefix("module.") for k in state_dict]
    for k, v in state_dict.items():
        _assert_same(v, got[k.removeprefix("module.")], k)


class _StorageRef:
    """Pickled as the persistent id ``pid`` by :func:`_write_legacy`."""

    def __init__(self, pid: tuple[Any, ...]) -> None:
        self.pid = pid


class _OldTensor:
    """Pickled as PyTorch < 0.4 did: ``torch._utils._rebuild_tensor(storage, offset, ...)``."""

    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride)

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch._utils._rebuild_tensor, self.args)


def _write_legacy(path: Path, obj: Any, storages: dict[str, tuple[int, bytes]]) -> Path:
    """A legacy file by hand: ``storages`` maps key -> (element count, raw bytes)."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, o: Any) -> Any:
            return o.pid if isinstance(o, _StorageRef) else None

    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"long": 8}}
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, sys_info):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(obj)
        pickle.dump(list(storages), f, protocol=2)
        for count, raw in storages.values():
            f.write(count.to_bytes(8, "little", signed=True) + raw)
    return path


def test_legacy_storage_views_of_old_files(tmp_path: Path) -> None:
    # PyTorch < 0.4 saved storage views: ('storage', type, root, location, root numel,
    # (view key, view offset, view numel)); the data section holds only the root.
    def ref(view: Any = None, numel: int = 10) -> _StorageRef:
        return _StorageRef(("storage", torch.FloatStorage, "root", "cpu", numel, view))

    root = (10, np.arange(10, dtype="<f4").tobytes())
    obj = {
        "whole": _OldTensor(ref(), 0, (2, 5), (5, 1)),
        "in_view": _OldTensor(ref(("v", 2, 5)), 1, (3,), (1,)),
        "view_2d": _OldTensor(ref(("w", 4, 6)), 0, (3, 2), (1, 3)),
    }
    path = _write_legacy(tmp_path / "views.pth", obj, {"root": root})
    expected = torch.load(path, weights_only=True)
    got = load(path)
    _assert_same(expected, got)
    np.testing.assert_array_equal(got["in_view"], [3, 4, 5])

    bad = {"x": _OldTensor(ref(("v", 8, 5)), 0, (1,), (1,))}
    with pytest.raises(CheckpointError, match="view .* exceeds"):
        load(_write_legacy(tmp_path / "bad_view.pth", bad, {"root": root}))
    bad = {"x": _OldTensor(ref(("v", 2, 5)), 3, (3,), (1,))}
    with pytest.raises(CheckpointError, match="exceeds its storage of 5 elements"):
        load(_write_legacy(tmp_path / "bad_tensor.pth", bad, {"root": root}))
    with pytest.raises(CheckpointError, match="holds 9 elements, 10 expected"):
        load(_write_legacy(tmp_path / "count.pth", obj, {"root": (9, root[1])}))
    with pytest.raises(CheckpointError, match="listed but"):
        load(_write_legacy(tmp_path / "extra.pth", obj, {"root": root, "zzz": (1, b"\0" * 4)}))
    with pytest.raises(CheckpointError, match="'root' is missing"):
        load(_write_legacy(tmp_path / "none.pth", obj, {}))
    with pytest.raises(CheckpointError, match="persistent id"):
        load(_write_legacy(tmp_path / "pid.pth", {"x": _StorageRef(("module", 1))}, {}))


def test_legacy_truncated(tmp_path: Path) -> None:
    good = _save_legacy({"w": torch.randn(64, 64), "v": torch.arange(8)}, tmp_path / "good.pth")
    data = good.read_bytes()
    header_end, pickle_end, keys_end, _ = _legacy_layout(good)
    cuts = {
        "in_header": 12,
        "after_header": header_end,
        "in_pickle": (header_end + pickle_end) // 2,
        "after_pickle": pickle_end,
        "in_keys": keys_end - 3,
        "in_count": keys_end + 4,
        "in_data": (keys_end + len(data)) // 2,
        "last_byte": len(data) - 1,
    }
    for what, cut in cuts.items():
        truncated = tmp_path / f"truncated_{what}.pth"
        truncated.write_bytes(data[:cut])
        for reader in (load, convert.load_torch_checkpoint):
            with pytest.raises(CheckpointError, match="truncated") as err:
                reader(truncated)
            message = str(err.value)
            assert message.startswith(f"{truncated}: ") and "\n" not in message, what


def test_legacy_truncated_at_every_byte_of_the_pickles(tmp_path: Path) -> None:
    # Every cut inside the header, object pickle or key list reads as a truncation: not as a
    # refused partial global name ('torch.') or a short number from a short read.
    good = _save_legacy({"w": torch.ones(2), "v": torch.arange(3)}, tmp_path / "good.pth")
    data = good.read_bytes()
    _, _, keys_end, _ = _legacy_layout(good)
    truncated = tmp_path / "cut.pth"
    for cut in range(1, keys_end):
        truncated.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"ends early \(truncated file\?\)$"):
            load(truncated)


def test_legacy_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / MARKER_NAME
    path = _save_legacy(
        {"state_dict": {"w": torch.ones(1)}, "payload": _Evil(marker)}, tmp_path / "evil.pth"
    )
    with pytest.raises(CheckpointError, match=r"refusing .*_make_marker") as err:
        load(path)
    assert str(path) in str(err.value)
    for reader in (load_torch_checkpoint, convert.load_torch_checkpoint):
        with pytest.raises(CheckpointError, match="refusing"):
            reader(path)
    assert not marker.exists()

    # A payload in each pickle of the sequence: header, object, key list.
    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    version = pickle.dumps(1001, protocol=2)
    info = pickle.dumps({"little_endian": True}, protocol=2)
    evil = pickle.dumps(_EvilSystem(marker), protocol=2)
    good_obj = pickle.dumps({"a": 1}, protocol=2)
    keys = pickle.dumps([], protocol=2)
    for name, parts in {
        "first": [evil],
        "sys_info": [magic, version, evil],
        "object": [magic, version, info, evil, keys],
        "keys": [magic, version, info, good_obj, evil],
    }.items():
        crafted = tmp_path / f"evil_{name}.pth"
        crafted.write_bytes(b"".join(parts))
        with pytest.raises(CheckpointError, match=r"refusing .*system"):
            convert.load_torch_checkpoint(crafted)
    assert not marker.exists()


def test_legacy_reads_without_torch(tmp_path: Path) -> None:
    from tests import torch_reference as R

    tv = R.randomize_(R.TorchvisionResNet(14, width=8), seed=5)
    weights = _save_legacy(tv.state_dict(), tmp_path / "resnet14-legacy.pth")
    ckpt = tmp_path / "ckpt.pth.tar"
    release_state = _release_checkpoint(ckpt, legacy=True)
    model = tmp_path / "model"
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import numpy as np
        from aia_jax import convert
        state = convert.load_torch_checkpoint({str(weights)!r})
        np.savez({str(tmp_path / "tv.npz")!r}, **state)
        release, info = convert.read_checkpoint({str(ckpt)!r})
        np.savez({str(tmp_path / "release.npz")!r}, **release)
        # The user's command: python -m aia_jax.convert imagenet --weights resnet50-19c8e357.pth
        from aia_jax.convert.__main__ import main
        code = main(["imagenet", "--weights", {str(weights)!r}, "--name", "TSM",
                     "--num-classes", "5", "--num-segments", "2", "--output", {str(model)!r}])
        assert code == 0 and sys.modules["torch"] is None
        print("ok", len(state), len(release), info["epoch"])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    sd = tv.state_dict()
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"wrote {model}: ")
    assert lines[-1].split() == ["ok", str(len(sd)), str(len(release_state)), "12"]
    with np.load(tmp_path / "tv.npz") as got:
        assert list(got) == list(sd)
        for k, v in sd.items():
            _assert_same(v, got[k], k)
    with np.load(tmp_path / "release.npz") as got:
        for k, v in release_state.items():
            _assert_same(v, got[k.removeprefix("module.")], k)

    from aia_jax import modelio

    variables, meta = modelio.load_model(str(model))
    assert (meta["name"], meta["depth"], meta["width"]) == ("TSM", 14, 8)
    conv1 = variables["params"]["base_model"]["conv1"]["kernel"]  # HWIO of torch's OIHW
    np.testing.assert_array_equal(conv1, sd["conv1.weight"].numpy().transpose(2, 3, 1, 0))
