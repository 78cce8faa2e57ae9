"""The torch-free checkpoint reader against ``torch.load(weights_only=True)`` on real files."""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from aia_jax.convert.torch_pickle import CheckpointError, load, load_torch_checkpoint

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


def _release_checkpoint(path: Path) -> collections.OrderedDict[str, torch.Tensor]:
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

    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        load(legacy)

    with pytest.raises(CheckpointError, match="directory"):
        load(tmp_path)


def test_non_tensor_state_dict_entry(tmp_path: Path) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"state_dict": {"module.w": torch.ones(1), "module.step": 3}}, path)
    with pytest.raises(CheckpointError, match="'module.step' is a int"):
        load_torch_checkpoint(path)
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_torch_checkpoint(path)
