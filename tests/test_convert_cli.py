"""`python -m aia_jax.convert`: each command end to end, logits against PyTorch, error exits.

The path under test is the user's: a file written by `torch.save` as the release writes it →
`torch2flax` → model directory → `aia_jax.modelio.load_model` → logits equal to the tests'
PyTorch implementation; and back with `flax2torch` into PyTorch's `load_state_dict(strict=True)`.
"""

import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402

from aia_jax import modelio  # noqa: E402
from aia_jax.convert import release  # noqa: E402
from aia_jax.convert.__main__ import main  # noqa: E402
from tests import torch_reference  # noqa: E402

# The command's path for each family of release keys: plain, one unit, two units, on both 2D
# forms. Every placement's conversion is checked through `release.from_torch` against the
# PyTorch reference in test_parity.py and bit for bit in test_convert_release.py.
NAMES = ["C2D", "TSM", "C2D_C_BN", "TSM_CinST_BN", "C2D_STinC_BN", "TSM_STinCplusCinST_BN"]
SEGMENTS, SIZE = 4, 64
REPO = Path(__file__).resolve().parents[1]


def _release_file(path: Path, name: str, *, depth=14, dropout=0.5, seed=0, num_classes=7):
    ref = torch_reference.build(
        name, num_classes=num_classes, num_segments=SEGMENTS, depth=depth, dropout=dropout, width=8
    )
    torch_reference.randomize_(ref, seed)
    if depth > 50:
        # 33 random residual blocks grow activations a thousandfold and float32 rounding with
        # them (as in test_parity); smaller residual branches keep the comparison meaningful.
        with torch.no_grad():
            for module_name, module in ref.named_modules():
                if module_name.endswith("bn3"):
                    module.weight.mul_(0.2)
    state = OrderedDict(("module." + k, v) for k, v in ref.state_dict().items())
    optimizer = {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]}
    wrapper = {"epoch": 7, "arch": f"resnet{depth}", "state_dict": state, "optimizer": optimizer}
    torch.save({**wrapper, "best_prec1": 33.0}, path)
    return ref, path


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors exit instead of returning
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _torch2flax(capsys, ckpt: Path, name: str, output: Path, *extra: str) -> None:
    code, out, err = _cli(
        capsys,
        "torch2flax",
        "--checkpoint",
        ckpt,
        "--name",
        name,
        "--num-segments",
        SEGMENTS,
        "--output",
        output,
        *extra,
    )
    assert code == 0, err
    assert out.startswith(f"wrote {output}: ")


def _clips(seed: int = 0):
    x = np.random.default_rng(seed).normal(size=(2, SEGMENTS, 3, SIZE, SIZE)).astype(np.float32)
    return x, np.transpose(x, (0, 1, 3, 4, 2))


def _rel_err(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _load(directory: Path):
    variables, meta = modelio.load_model(str(directory))
    return modelio.create_model(meta), variables, meta


def _eval_logits(model, variables, x):
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


@pytest.mark.parametrize("name", NAMES)
def test_torch2flax_eval_logits_match_pytorch(tmp_path, capsys, name):
    ref, ckpt = _release_file(tmp_path / "ckpt.best.pth.tar", name, seed=NAMES.index(name))
    _torch2flax(capsys, ckpt, name, tmp_path / "model")
    model, variables, meta = _load(tmp_path / "model")
    assert meta["name"] == name and meta["num_classes"] == 7 and meta["depth"] == 14
    assert meta["width"] == 8 and meta["dropout"] == 0.5 and meta["num_segments"] == SEGMENTS
    assert meta["source"]["epoch"] == 7 and meta["source"]["best_prec1"] == 33.0
    x_torch, x_flax = _clips()
    with torch.no_grad():
        want = ref.eval()(torch.from_numpy(x_torch)).numpy()
    assert _rel_err(_eval_logits(model, variables, x_flax), want) < 1e-5


@pytest.mark.parametrize("name", ["C2D_STinC_BN", "TSM_CinST_BN", "TSM"])
def test_torch2flax_train_logits_match_pytorch(tmp_path, capsys, name):
    # Dropout 0 (the release's base_model.fc head; the CLI infers the dropout from it).
    ref, ckpt = _release_file(tmp_path / "c.pth.tar", name, dropout=0.0, seed=1)
    _torch2flax(capsys, ckpt, name, tmp_path / "model")
    model, variables, meta = _load(tmp_path / "model")
    assert meta["dropout"] == 0.0
    x_torch, x_flax = _clips(1)
    with torch.no_grad():
        want = ref.train()(torch.from_numpy(x_torch)).numpy()
    got, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x_flax
    )
    assert _rel_err(np.asarray(got), want) < 1e-5


@pytest.mark.slow
def test_torch2flax_resnet101_infers_the_depth(tmp_path, capsys):
    ref, ckpt = _release_file(tmp_path / "c.pth.tar", "TSM_CinST_BN", depth=101, seed=2)
    _torch2flax(capsys, ckpt, "TSM_CinST", tmp_path / "model")  # `_BN` may be left out
    model, variables, meta = _load(tmp_path / "model")
    assert meta["depth"] == 101 and meta["name"] == "TSM_CinST_BN"
    x_torch, x_flax = _clips(2)
    with torch.no_grad():
        want = ref.eval()(torch.from_numpy(x_torch)).numpy()
    assert _rel_err(_eval_logits(model, variables, x_flax), want) < 1e-5


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A C2D_CinST2STinC release file converted by the CLI, and its PyTorch network."""
    tmp = tmp_path_factory.mktemp("converted")
    ref, ckpt = _release_file(tmp / "ckpt.pth.tar", "C2D_CinST2STinC_BN", seed=5)
    assert main(["torch2flax", "--checkpoint", str(ckpt), "--name", "C2D_CinST2STinC_BN",
                 "--num-segments", str(SEGMENTS), "--output", str(tmp / "model")]) == 0  # fmt: skip
    return ref, ckpt, tmp / "model"


def test_flax2torch_pth_loads_strictly_into_pytorch(tmp_path, capsys, converted):
    ref, ckpt, model_dir = converted
    code, out, err = _cli(
        capsys, "flax2torch", "--checkpoint", model_dir, "--output", tmp_path / "back.pth.tar"
    )
    assert code == 0, err
    obj = torch.load(tmp_path / "back.pth.tar", weights_only=True)
    assert set(obj) == {"epoch", "arch", "state_dict", "optimizer", "best_prec1"}
    assert (obj["epoch"], obj["arch"], obj["best_prec1"]) == (7, "resnet14", 33.0)
    original = torch.load(ckpt, weights_only=True)["state_dict"]
    # The whole file round trip is bit-exact, num_batches_tracked included.
    assert list(obj["state_dict"]) == list(original)
    assert all(torch.equal(obj["state_dict"][k], v) for k, v in original.items())

    fresh = torch_reference.build(
        "C2D_CinST2STinC_BN", num_classes=7, num_segments=SEGMENTS, depth=14, width=8
    )
    fresh.load_state_dict(release.strip_prefix(obj["state_dict"]), strict=True)
    x_torch, x_flax = _clips(3)
    with torch.no_grad():
        want = ref.eval()(torch.from_numpy(x_torch)).numpy()
        got = fresh.eval()(torch.from_numpy(x_torch)).numpy()
    np.testing.assert_array_equal(got, want)
    model, variables, _ = _load(model_dir)
    assert _rel_err(_eval_logits(model, variables, x_flax), got) < 1e-5


def test_flax2torch_bare_and_safetensors(tmp_path, capsys, converted):
    from safetensors.numpy import load_file

    _, ckpt, model_dir = converted
    original = torch.load(ckpt, weights_only=True)["state_dict"]
    out = tmp_path / "new_folder" / "w.safetensors"  # the folder is created
    code, _, err = _cli(capsys, "flax2torch", "--checkpoint", model_dir, "--output", out)
    assert code == 0, err
    assert os.stat(out).st_mode & 0o777 == os.stat(ckpt).st_mode & 0o777  # as torch.save's
    tensors = load_file(str(out))
    assert set(tensors) == set(original)
    for key, value in original.items():
        assert tensors[key].dtype == value.numpy().dtype
        assert tensors[key].shape == tuple(value.shape), key  # 0-d counters stay 0-d
        assert tensors[key].tobytes() == value.numpy().tobytes(), key

    code, _, err = _cli(
        capsys, "flax2torch", "--checkpoint", model_dir, "--output", tmp_path / "b.pth", "--bare"
    )
    assert code == 0, err
    bare = torch.load(tmp_path / "b.pth", weights_only=True)
    assert list(bare) == [k.removeprefix("module.") for k in original]
    fresh = torch_reference.build(
        "C2D_CinST2STinC_BN", num_classes=7, num_segments=SEGMENTS, depth=14, width=8
    )
    fresh.load_state_dict(bare, strict=True)

    # A safetensors file converts back too (torch2flax reads it without torch).
    _torch2flax(capsys, out, "C2D_CinST2STinC_BN", tmp_path / "again")
    again, meta = modelio.load_model(str(tmp_path / "again"))
    first, _ = modelio.load_model(str(model_dir))
    assert meta["source"]["epoch"] == 7
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, first)


def test_imagenet_command(tmp_path, capsys):
    # Tiny (depth 14) to keep it quick; ResNet-50 is covered in test_convert_imagenet.py.
    tv = torch_reference.randomize_(torch_reference.TorchvisionResNet(14, width=8), 3)
    torch.save(tv.state_dict(), tmp_path / "resnet50-w8.pth")
    code, out, err = _cli(
        capsys,
        "imagenet",
        "--weights",
        tmp_path / "resnet50-w8.pth",
        "--name",
        "TSM_CinST_BN",
        "--num-classes",
        174,
        "--num-segments",
        SEGMENTS,
        "--output",
        tmp_path / "model",
    )
    assert code == 0, err
    assert "torchvision fc dropped" in out
    variables, meta = modelio.load_model(str(tmp_path / "model"))
    assert (meta["name"], meta["depth"], meta["width"], meta["num_classes"]) == (
        "TSM_CinST_BN",
        14,
        8,
        174,
    )
    source = tv.state_dict()
    for key, value in release.to_torch(variables, modelio.create_model(meta)).items():
        key = key.removeprefix("module.base_model.")
        if key in source and not key.startswith("fc.") and "num_batches" not in key:
            assert value.tobytes() == source[key].numpy().tobytes(), key
    np.testing.assert_array_equal(variables["params"]["new_fc"]["bias"], np.zeros(174))
    assert "eft" in variables["params"]["base_model"]["layer1_0"]


# ---------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def cinst_file(tmp_path_factory):
    return _release_file(tmp_path_factory.mktemp("cinst") / "ckpt.pth.tar", "TSM_CinST_BN")[1]


def _fails(capsys, *argv) -> str:
    code, out, err = _cli(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"python -m aia_jax.convert {argv[0]}: error: ")
    return lines[0]


def _t2f(capsys, ckpt, name, output, *extra) -> str:
    return _fails(
        capsys, "torch2flax", "--checkpoint", ckpt, "--name", name, "--output", output, *extra
    )


def test_usage_errors_are_one_line(capsys):
    line = _fails(capsys, "torch2flax", "--checkpoint", "release.pth.tar", "--depth", "x")
    assert line == (
        "python -m aia_jax.convert torch2flax: error: argument --depth: invalid int value: 'x'"
    )


def test_missing_file(tmp_path, capsys):
    line = _t2f(capsys, tmp_path / "nope.pth.tar", "TSM", tmp_path / "m")
    assert "nope.pth.tar: no such file" in line
    assert not (tmp_path / "m").exists()


def test_text_file(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    assert "not a PyTorch checkpoint" in _t2f(capsys, tmp_path / "notes.pth", "TSM", tmp_path / "m")


def test_truncated_file(tmp_path, capsys, cinst_file):
    data = cinst_file.read_bytes()
    (tmp_path / "cut.pth.tar").write_bytes(data[: len(data) // 2])
    line = _t2f(capsys, tmp_path / "cut.pth.tar", "TSM_CinST_BN", tmp_path / "m")
    assert "truncated" in line


def test_wrong_name(tmp_path, capsys, cinst_file):
    line = _t2f(capsys, cinst_file, "TSM", tmp_path / "m")
    assert "does not fit TSM ResNet-14" in line
    assert "attention: checkpoint has units {'eft': ['C', 'H', 'T', 'W']}" in line
    assert "unexpected: base_model.layer1.0.eft.C_bn.bias" in line
    assert not (tmp_path / "m").exists()


def test_wrong_depth_and_classes(tmp_path, capsys, cinst_file):
    line = _t2f(capsys, cinst_file, "TSM_CinST_BN", tmp_path / "m", "--depth", "50")
    assert "depth: checkpoint has ResNet-14, model is 50" in line and "missing: " in line
    line = _t2f(capsys, cinst_file, "TSM_CinST_BN", tmp_path / "m", "--num-classes", "10")
    assert "classes: checkpoint has 7, model has 10" in line and "wrong shape: " in line


def test_unknown_name_and_i3d(tmp_path, capsys, cinst_file):
    assert "valid names: C2D, C2D_C_BN" in _t2f(capsys, cinst_file, "TSM_Cin", tmp_path / "m")
    assert "no I3D networks" in _t2f(capsys, cinst_file, "I3D_CinST_BN", tmp_path / "m")


def test_existing_output(tmp_path, capsys, cinst_file):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("x")
    assert "already exists" in _t2f(capsys, cinst_file, "TSM_CinST_BN", tmp_path / "m")


def test_commands_refuse_the_other_kind_of_weights(tmp_path, capsys, cinst_file):
    tv = torch_reference.TorchvisionResNet(14, width=8)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    assert "use the 'imagenet' command" in _t2f(capsys, tmp_path / "tv.pth", "TSM", tmp_path / "m")
    line = _fails(capsys, "imagenet", "--weights", cinst_file, "--name", "TSM",
                  "--num-classes", "5", "--output", tmp_path / "m")  # fmt: skip
    assert "use the 'torch2flax' command" in line


def test_imagenet_wrong_depth(tmp_path, capsys):
    torch.save(torch_reference.TorchvisionResNet(14, width=8).state_dict(), tmp_path / "tv.pth")
    line = _fails(capsys, "imagenet", "--weights", tmp_path / "tv.pth", "--name", "C2D",
                  "--num-classes", "5", "--depth", "50", "--output", tmp_path / "m")  # fmt: skip
    assert "depth: weights are ResNet-14, network is 50" in line


def test_flax2torch_errors(tmp_path, capsys):
    line = _fails(capsys, "flax2torch", "--checkpoint", tmp_path / "none", "--output", "x.pth")
    assert "no such model directory" in line
    (tmp_path / "empty").mkdir()
    line = _fails(capsys, "flax2torch", "--checkpoint", tmp_path / "empty", "--output", "x.pth")
    assert "not a model directory" in line


def test_malformed_tensors_and_model_json_are_named(tmp_path, capsys, cinst_file):
    state = torch.load(cinst_file, weights_only=True)
    state["state_dict"]["module.new_fc.weight"] = torch.zeros(())
    torch.save(state, tmp_path / "scalar_fc.pth")
    line = _t2f(capsys, tmp_path / "scalar_fc.pth", "TSM_CinST_BN", tmp_path / "m")
    assert "new_fc.weight: a 2-D tensor expected, shape () found" in line
    tv = torch_reference.TorchvisionResNet(14, width=8).state_dict()
    tv["conv1.weight"] = torch.zeros(())
    torch.save(tv, tmp_path / "tv.pth")
    line = _fails(capsys, "imagenet", "--weights", tmp_path / "tv.pth", "--name", "C2D",
                  "--num-classes", "5", "--output", tmp_path / "m")  # fmt: skip
    assert "conv1.weight: a 4-D tensor expected, shape () found" in line
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.json").write_text('{"name": ')
    line = _fails(capsys, "flax2torch", "--checkpoint", tmp_path / "bad", "--output", "x.pth")
    assert f"{tmp_path / 'bad' / 'model.json'}: not valid JSON" in line


def test_subprocess_help_and_error_exit(tmp_path, cinst_file):
    run = [sys.executable, "-m", "aia_jax.convert"]
    result = subprocess.run([*run, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("torch2flax", "flax2torch", "imagenet"):
        assert f"python -m aia_jax.convert {command} --checkpoint" in result.stdout or (
            command == "imagenet"
            and "python -m aia_jax.convert imagenet --weights" in result.stdout
        )
    help_t2f = subprocess.run(
        [*run, "torch2flax", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    ).stdout
    assert "TSM and C2D checkpoints" in " ".join(help_t2f.split())
    data = cinst_file.read_bytes()
    (tmp_path / "cut.pth.tar").write_bytes(data[: len(data) - 1000])
    result = subprocess.run(
        [*run, "torch2flax", "--checkpoint", str(tmp_path / "cut.pth.tar"), "--name", "TSM",
         "--output", str(tmp_path / "m")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_double_module_prefix_keeps_the_width(tmp_path, capsys, cinst_file):
    """A network wrapped twice in DataParallel: the width is read from its conv1 all the same."""
    state = torch.load(cinst_file, weights_only=True)
    state["state_dict"] = OrderedDict(("module." + k, v) for k, v in state["state_dict"].items())
    torch.save(state, tmp_path / "double.pth.tar")
    _torch2flax(capsys, tmp_path / "double.pth.tar", "TSM_CinST_BN", tmp_path / "m")
    assert modelio.read_meta(str(tmp_path / "m"))["width"] == 8


def test_help_says_legacy_files_are_read_without_torch():
    from aia_jax.convert.__main__ import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "PyTorch is needed only to write .pth files" in text
    assert "to read pre-1.6" not in text


def test_init_from_a_release_file_of_another_variant(tmp_path):
    """init_from a plain release network into an attention network (and a dropout-0 head into
    a dropout-0.5 one): what both have is copied, the rest keeps its fresh value."""
    meta = modelio.model_meta(
        "TSM_CinST_BN", num_classes=7, num_segments=SEGMENTS, depth=14, width=8, dropout=0.5
    )
    fresh = jax.tree.map(
        lambda s: np.zeros(s.shape, s.dtype),
        release.variable_shapes(modelio.create_model(meta)),
    )
    _, plain = _release_file(tmp_path / "plain.pth.tar", "TSM")
    merged, copied, kept = modelio.merge_for_init(fresh, modelio.load_for_init(str(plain), meta))
    assert kept and all("/eft/" in k for k in kept)
    assert "params/base_model/conv1/kernel" in copied and "params/new_fc/kernel" in copied
    _, fc = _release_file(tmp_path / "fc.pth.tar", "TSM_CinST_BN", dropout=0)
    _, copied, kept = modelio.merge_for_init(fresh, modelio.load_for_init(str(fc), meta))
    assert sorted(kept) == ["params/new_fc/bias", "params/new_fc/kernel"]
