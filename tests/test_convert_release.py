"""Release checkpoint files ⇄ Flax variables: bit-exact round trips, key order, error messages.

Checkpoints are written the way the release's training script writes them: `torch.save` of
`{'epoch', 'arch', 'state_dict', 'optimizer', 'best_prec1'}` with the DataParallel-prefixed
state dict of the tests' independent PyTorch model, and read back without torch.
"""

import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from aia_jax import convert, models  # noqa: E402
from aia_jax.convert import release  # noqa: E402
from tests import torch_reference  # noqa: E402

PLACEMENTS = list(models.PLACEMENTS)  # all eleven, "none" included
SEGMENTS = 4
KEY_LISTS = Path(__file__).parent / "data" / "official_keys"
REPO = Path(__file__).resolve().parents[1]


def _name(form: str, placement: str) -> str:
    return form if placement == "none" else f"{form}_{placement}_BN"


def _reference_state(name: str, *, depth: int = 14, dropout: float = 0.5, seed: int = 0):
    ref = torch_reference.build(
        name, num_classes=7, num_segments=SEGMENTS, depth=depth, dropout=dropout, width=8
    )
    torch_reference.randomize_(ref, seed)
    return OrderedDict(("module." + k, v) for k, v in ref.state_dict().items())


def _save_release(path: Path, state: OrderedDict, *, arch: str = "resnet14") -> Path:
    # As the release's training script saves (its optimizer entry holds SGD's state dict).
    optimizer = {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.9, "params": [0, 1]}]}
    torch.save(
        {
            "epoch": 12,
            "arch": arch,
            "state_dict": state,
            "optimizer": optimizer,
            "best_prec1": 47.5,
        },
        path,
    )
    return path


def _model(name: str, *, depth: int = 14, dropout: float = 0.5, num_classes: int = 7):
    return models.create(
        name,
        num_classes=num_classes,
        num_segments=SEGMENTS,
        depth=depth,
        width=8,
        dropout=dropout,
    )


def _assert_bit_exact(got: dict, want: OrderedDict) -> None:
    assert list(got) == list(want)  # same keys in the same (the release's) order
    for key, value in want.items():
        expected = value.numpy()
        assert got[key].dtype == expected.dtype, key
        assert got[key].shape == expected.shape, key
        assert got[key].tobytes() == expected.tobytes(), key


@pytest.mark.parametrize("form", ["C2D", "TSM"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_release_file_round_trip_is_bit_exact(tmp_path, form, placement):
    name = _name(form, placement)
    state = _reference_state(name, seed=PLACEMENTS.index(placement))
    path = _save_release(tmp_path / "ckpt.best.pth.tar", state)
    loaded, info = convert.read_checkpoint(path)
    assert info == {"epoch": 12, "arch": "resnet14", "best_prec1": 47.5}
    model = _model(name)
    variables = convert.from_torch(loaded, model)
    back = convert.to_torch(variables, model, num_batches_tracked=convert.batch_counters(loaded))
    _assert_bit_exact(back, state)


@pytest.mark.parametrize("name", ["TSM_CinST_BN", "C2D_STinCplusCinST_BN"])
def test_round_trip_with_the_dropout_zero_head(tmp_path, name):
    state = _reference_state(name, dropout=0.0)
    assert "module.base_model.fc.weight" in state and "module.new_fc.weight" not in state
    loaded = convert.load_torch_checkpoint(_save_release(tmp_path / "c.pth.tar", state))
    model = _model(name, dropout=0.0)
    variables = convert.from_torch(loaded, model)
    assert "fc" in variables["params"]["base_model"]
    back = convert.to_torch(variables, model, num_batches_tracked=convert.batch_counters(loaded))
    _assert_bit_exact(back, state)


def test_resnet101_round_trip(tmp_path):
    state = _reference_state("TSM_STinC_BN", depth=101)
    loaded = convert.load_torch_checkpoint(_save_release(tmp_path / "c.pth.tar", state))
    model = _model("TSM_STinC_BN", depth=101)
    back = convert.to_torch(
        convert.from_torch(loaded, model), model, num_batches_tracked=convert.batch_counters(loaded)
    )
    _assert_bit_exact(back, state)


def test_one_counter_value_for_all_batchnorms():
    state = _reference_state("C2D_C_BN")
    model = _model("C2D_C_BN")
    out = convert.to_torch(convert.from_torch(state, model), model, num_batches_tracked=4321)
    counters = {k: v for k, v in out.items() if k.endswith("num_batches_tracked")}
    assert set(counters) == {k for k in state if k.endswith("num_batches_tracked")}
    assert all(v.dtype == np.int64 and v.shape == () and v == 4321 for v in counters.values())


@pytest.mark.parametrize(
    "stem",
    ["C2D_C_BN_resnet50_174cls", "TSM_CinST_BN_resnet101_174cls", "TSM_resnet50_174cls"],
)
def test_to_torch_writes_the_official_key_order(stem):
    lines = (KEY_LISTS / f"{stem}.txt").read_text().splitlines()
    header = dict(kv.split("=") for kv in lines[1].lstrip("# ").split())
    want = [line.split()[0] for line in lines if line and not line.startswith("#")]
    model = models.create(
        header["net"],
        num_classes=int(header["num_class"]),
        depth=int(header["arch"].removeprefix("resnet")),
        dropout=float(header["dropout"]),
    )
    zeros = {
        c: _map(tree, lambda s: np.zeros(s.shape, s.dtype))
        for c, tree in release.variable_shapes(model).items()
    }
    assert list(convert.to_torch(zeros, model)) == want


def _map(tree, fn):
    return {k: _map(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


# ---------------------------------------------------------------- errors and cross-checks


@pytest.fixture(scope="module")
def cinst_state():
    return _reference_state("TSM_CinST_BN")


def _error(state, model) -> str:
    with pytest.raises(convert.ConversionError) as info:
        convert.from_torch(state, model)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_one_error_lists_missing_unexpected_and_wrong_shape_keys(cinst_state):
    state = OrderedDict(cinst_state)
    del state["module.base_model.layer2.0.conv1.weight"]
    state["module.base_model.layer2.0.conv9.weight"] = torch.zeros(3)
    state["module.base_model.layer3.0.bn2.bias"] = torch.zeros(5)
    message = _error(state, _model("TSM_CinST_BN"))
    assert "missing: base_model.layer2.0.conv1.weight" in message
    assert "unexpected: base_model.layer2.0.conv9.weight" in message
    assert "wrong shape: base_model.layer3.0.bn2.bias (32,) expected, (5,) found" in message
    assert message.index("missing") < message.index("unexpected") < message.index("wrong shape")


def test_cross_check_names_the_attention_placement(cinst_state):
    message = _error(cinst_state, _model("TSM"))
    assert "attention: checkpoint has units {'eft': ['C', 'H', 'T', 'W']}" in message
    assert "placement 'none' has none" in message
    assert "unexpected: base_model.layer1.0.eft.C_bn.bias" in message
    message = _error(cinst_state, _model("TSM_C2ST_BN"))
    assert "placement 'C2ST' has {'eft1': ['C'], 'eft2': ['H', 'T', 'W']}" in message
    assert "missing:" in message and "unexpected:" in message


def test_cross_check_names_the_depth(cinst_state):
    message = _error(cinst_state, _model("TSM_CinST_BN", depth=50))
    assert message.startswith("checkpoint does not fit TSM_CinST_BN ResNet-50 with 7 classes")
    assert "depth: checkpoint has ResNet-14, model is 50" in message
    assert "missing: " in message


def test_cross_check_names_the_width(cinst_state):
    model = models.create("TSM_CinST_BN", num_classes=7, num_segments=SEGMENTS, depth=14, width=16)
    message = _error(cinst_state, model)
    assert "width: checkpoint has stem width 8, model has 16" in message
    assert "wrong shape: " in message


def test_cross_check_names_the_classes(cinst_state):
    message = _error(cinst_state, _model("TSM_CinST_BN", num_classes=9))
    assert "classes: checkpoint has 7, model has 9" in message
    assert "wrong shape: new_fc.bias (9,) expected, (7,) found" in message
    assert "new_fc.weight (9, 256) expected, (7, 256) found" in message


def test_cross_check_names_the_classifier_layout(cinst_state):
    message = _error(cinst_state, _model("TSM_CinST_BN", dropout=0.0))
    assert "classifier: checkpoint has new_fc, a dropout-0.0 model has fc" in message
    assert "missing: base_model.fc.bias, base_model.fc.weight" in message
    assert "unexpected: new_fc.bias, new_fc.weight" in message


def test_non_float_and_scalar_tensors_are_named(cinst_state):
    state = OrderedDict(cinst_state)
    state["module.base_model.layer1.0.eft.T_conv.weight"] = torch.zeros(1, 2, 3, 3, 3).to(
        torch.complex64
    )
    state["module.base_model.bn1.weight"] = torch.ones(8, dtype=torch.int64)
    message = _error(state, _model("TSM_CinST_BN"))
    want = "base_model.layer1.0.eft.T_conv.weight: a floating-point tensor expected, complex64"
    assert want in message
    assert "base_model.bn1.weight: a floating-point tensor expected, int64 found" in message
    state = OrderedDict(cinst_state)
    state["module.new_fc.weight"] = torch.zeros(())
    with pytest.raises(convert.ConversionError, match=r"^new_fc.weight: a 2-D tensor expected, "):
        convert.from_torch(state, _model("TSM_CinST_BN"))


def test_same_unit_placements_cannot_be_told_apart(cinst_state):
    # CinST and STinC own the same gates: the keys fit, the user's name decides (see --help).
    assert convert.from_torch(cinst_state, _model("TSM_STinC_BN"))
    found = convert.describe_checkpoint(cinst_state)
    assert found == {
        "depth": 14,
        "num_classes": 7,
        "head": "new_fc",
        "units": {"eft": ["C", "H", "T", "W"]},
    }


# ---------------------------------------------------------------- file formats


def test_safetensors_round_trip_without_torch(tmp_path, cinst_state):
    model = _model("TSM_CinST_BN")
    counters = convert.batch_counters(cinst_state)
    out = convert.to_torch(
        convert.from_torch(cinst_state, model), model, num_batches_tracked=counters
    )
    path = tmp_path / "net.safetensors"
    convert.save_torch(out, path, epoch=3, best_prec1=40.25)
    loaded, info = convert.read_checkpoint(path)
    assert info == {"epoch": 3, "arch": "resnet14", "best_prec1": 40.25}
    assert set(loaded) == {k.removeprefix("module.") for k in cinst_state}
    for key, value in cinst_state.items():
        assert loaded[key.removeprefix("module.")].tobytes() == value.numpy().tobytes()


def test_damaged_safetensors_is_a_checkpoint_error(tmp_path, cinst_state):
    path = tmp_path / "net.safetensors"
    convert.save_torch({k: v.numpy() for k, v in cinst_state.items()}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(convert.CheckpointError, match="not a readable safetensors file"):
        convert.load_torch_checkpoint(path)


def test_safetensors_dtype_numpy_lacks_is_a_checkpoint_error(tmp_path):
    # safetensors' numpy reader has no float8: it raised a bare AttributeError (a traceback).
    from safetensors.torch import save_file

    path = tmp_path / "f8.safetensors"
    save_file({"ok": torch.ones(2), "w": torch.ones(2).to(torch.float8_e4m3fn)}, str(path))
    with pytest.raises(convert.CheckpointError, match=r"f8.safetensors: tensor 'w' has dtype F8"):
        convert.load_torch_checkpoint(path)


def test_save_torch_wraps_like_the_release(tmp_path, cinst_state):
    path = tmp_path / "out.pth.tar"
    convert.save_torch({k: v.numpy() for k, v in cinst_state.items()}, path, epoch=5)
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"epoch", "arch", "state_dict", "optimizer", "best_prec1"}
    assert obj["arch"] == "resnet14" and obj["epoch"] == 5 and obj["optimizer"] is None
    assert list(obj["state_dict"]) == list(cinst_state)
    bare = tmp_path / "bare.pth"
    convert.save_torch({k: v.numpy() for k, v in cinst_state.items()}, bare, wrap=False)
    assert list(torch.load(bare, weights_only=True)) == list(cinst_state)


@pytest.mark.parametrize("suffix", [".pth.tar", ".safetensors"])
def test_save_torch_writes_whole_or_not_at_all(tmp_path, monkeypatch, suffix):
    # A crash or a full disk mid-write must leave the previous file (or none), never a half
    # checkpoint or a stray temporary file; the bytes reach the disk before the rename.
    state = {"module.new_fc.weight": np.ones((3, 4), np.float32)}
    path = tmp_path / f"ckpt{suffix}"
    path.write_bytes(b"previous")
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", no_space)
        with pytest.raises(OSError, match="No space"):
            convert.save_torch(state, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert path.read_bytes() == b"previous" and synced
    convert.save_torch(state, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert (
        convert.load_torch_checkpoint(path)["new_fc.weight"].tobytes()
        == np.ones(12, "f4").tobytes()
    )


def test_legacy_pth_files_are_read_without_torch(tmp_path, cinst_state, monkeypatch):
    # torchvision's resnet50-19c8e357.pth predates the zip format; it is read without torch.
    path = tmp_path / "legacy.pth"
    torch.save(dict(cinst_state), path, _use_new_zipfile_serialization=False)
    loaded = convert.load_torch_checkpoint(path)
    assert list(loaded) == [k.removeprefix("module.") for k in cinst_state]
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    assert list(convert.load_torch_checkpoint(path)) == list(loaded)
    with pytest.raises(ImportError, match="needs PyTorch"):
        convert.save_torch({"a": np.zeros(2, np.float32)}, tmp_path / "x.pth")


def test_conversion_needs_no_torch(tmp_path, cinst_state):
    path = _save_release(tmp_path / "ckpt.pth.tar", cinst_state)
    script = textwrap.dedent(
        f"""
        import sys
        import aia_jax.convert
        assert "torch" not in sys.modules, "importing aia_jax.convert imported torch"
        sys.modules["torch"] = None  # any import of torch now fails
        from aia_jax import convert, models
        state = convert.load_torch_checkpoint({str(path)!r})
        model = models.create("TSM_CinST_BN", num_classes=7, num_segments=4, depth=14, width=8)
        out = convert.to_torch(convert.from_torch(state, model), model)
        convert.save_torch(out, {str(tmp_path / "x.safetensors")!r})
        print("ok", len(out))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", str(len(cinst_state))]


def test_variable_shapes_are_traced_once_per_model_and_copied_per_call():
    def make(classes):
        return models.create("TSM_CinST_BN", num_classes=classes, depth=14, width=8)

    release._traced_shapes.cache_clear()
    first = release.variable_shapes(make(3))
    first["params"].clear()  # a caller editing its copy changes nobody else's
    again = release.variable_shapes(make(3))  # an equal, separately built module
    assert release._traced_shapes.cache_info().hits == 1
    assert again["params"]["new_fc"]["kernel"].shape == (256, 3)  # width 8: 8 * 32 features
    other = release.variable_shapes(make(5))
    assert other["params"]["new_fc"]["kernel"].shape == (256, 5)
