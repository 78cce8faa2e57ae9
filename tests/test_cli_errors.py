"""The command-line programs report bad input as one line `<program>: error: …`, exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from aia_jax import evaluate, export, predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_py(config, workdir, *args) -> subprocess.CompletedProcess:
    """`python train.py --config CONFIG --workdir WORKDIR ARGS…` from the repository root."""
    return subprocess.run(
        [sys.executable, "train.py", "--config", str(config), "--workdir", str(workdir), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_error_line(capsys, main, argv, program) -> str:
    """The one line a program prints to stderr for bad input (argparse's errors included)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[-1].startswith(f"{program}: error: "), lines
    return lines[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.foo=1"], "--config.foo: the config has no field 'foo'"),
        (["--config.data.nope=1"], "--config.data.nope: the config has no field 'data.nope'"),
        (  # a near miss: ml_collections adds a suggestion on a second line of its KeyError
            ["--config.model.nmae=C2D"],
            "--config.model.nmae: the config has no field 'model.nmae' "
            '(Did you mean "name" instead of "nmae"?)',
        ),
    ],
)
def test_evaluate_config_errors(capsys, tmp_path, args, message):
    argv = ["evaluate", "--config", os.path.join(ROOT, "configs", "default.py"), *args]
    argv += ["--checkpoint", str(tmp_path)]
    line = _one_error_line(capsys, evaluate.main, argv, "python -m aia_jax.evaluate")
    assert line.endswith(message)


def test_evaluate_finds_the_configs_package_from_any_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in sys.path if os.path.abspath(p or ".") != ROOT])
    for name in [m for m in sys.modules if m == "configs" or m.startswith("configs.")]:
        monkeypatch.delitem(sys.modules, name)
    argv = ["evaluate", "--config", os.path.join(ROOT, "configs", "default.py")]
    argv += ["--checkpoint", str(tmp_path / "none")]
    line = _one_error_line(capsys, evaluate.main, argv, "python -m aia_jax.evaluate")
    assert "none/model.json not found" in line  # the config loaded; the checkpoint is missing
    argv = ["evaluate", "--checkpoint", str(tmp_path / "none")]
    line = _one_error_line(capsys, evaluate.main, argv, "python -m aia_jax.evaluate")
    assert line.endswith(f"--checkpoint {tmp_path / 'none'}: no such model directory or workdir")


def test_evaluate_missing_config_file_and_checkpoint(capsys, tmp_path):
    argv = ["evaluate", "--config", str(tmp_path / "nope.py"), "--checkpoint", str(tmp_path)]
    line = _one_error_line(capsys, evaluate.main, argv, "python -m aia_jax.evaluate")
    assert f"--config {tmp_path / 'nope.py'}: cannot load the config file: [Errno 2]" in line
    argv = ["evaluate", "--config", os.path.join(ROOT, "configs", "default.py")]
    line = _one_error_line(
        capsys, evaluate.main, [*argv, "--checkpoint", str(tmp_path)], "python -m aia_jax.evaluate"
    )
    assert f"{tmp_path / 'model.json'} not found: {tmp_path} is not a model directory" in line


def test_predict_and_export_errors(capsys, tmp_path):
    program = "python -m aia_jax.predict"
    argv = ["v.mp4", "--checkpoint", "m", "--top", "0"]
    line = _one_error_line(capsys, predict.main, argv, program)
    assert line.endswith("argument --top: '0': expected a positive integer")
    argv = ["v.mp4", "--checkpoint", "m", "--resize", "32"]
    line = _one_error_line(capsys, predict.main, argv, program)
    assert line.endswith("argument --resize: '32': expected H,W (two positive integers)")
    argv = ["v.mp4", "--checkpoint", str(tmp_path)]
    assert "is not a model directory" in _one_error_line(capsys, predict.main, argv, program)
    (tmp_path / "release.pth.tar").write_bytes(b"")
    argv = ["v.mp4", "--checkpoint", str(tmp_path / "release.pth.tar")]
    line = _one_error_line(capsys, predict.main, argv, program)
    assert "a PyTorch checkpoint, not a model directory; convert it first" in line
    argv = ["--checkpoint", "m", "--output", "m.jaxexport", "--crop-size", "0"]
    line = _one_error_line(capsys, export.main, argv, "python -m aia_jax.export")
    assert line.endswith("argument --crop-size: '0': expected a positive integer")
    argv = ["--checkpoint", str(tmp_path), "--output", str(tmp_path / "m.jaxexport")]
    line = _one_error_line(capsys, export.main, argv, "python -m aia_jax.export")
    assert "is not a model directory" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.foo=1"], "train.py: error: --config.foo: the config has no field 'foo'"),
        (["--config.batch_size=abc"], "train.py: error: flag --config.batch_size=abc: "),
        (["--config.data.root=/nonexistent", "--config.data.source=frames"],
         "train.py: error: config.data.root /nonexistent: not a directory"),
        (["--config.grad_accum_steps=0"],
         "train.py: error: config.grad_accum_steps 0: expected a positive integer"),
        (["--config.num_epochs=-1"],
         "train.py: error: config.num_epochs -1.0: expected a positive"),
        (["--config.optimizer.lr_steps=('abc',)"],
         "train.py: error: config.optimizer.lr_steps ('abc',): expected epochs"),
        (["--config.model.depth=33"], "train.py: error: config.model: depth must be one of"),
        (["--config.model.name=TSM_Foo"], "train.py: error: config.model: unknown model name"),
        (["--config.data.crop_size=64"], "train.py: error: config.data.crop_size 64 is larger"),
        (["--config.distributed.auto=True"],
         "train.py: error: distributed.auto=True but JAX's cluster detection found no cluster"),
    ],
)  # fmt: skip
def test_train_py_errors(tmp_path, args, message):
    result = _train_py("configs/default.py", tmp_path / "w", *args)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr
    assert "device(s); global batch" not in result.stdout + result.stderr  # checks come first
    assert not (tmp_path / "w").exists()  # a run that fails its checks leaves no empty workdir


def test_train_py_rejects_a_misspelt_field_of_the_config_file(tmp_path):
    """The command line's misspelt overrides are ml_collections' errors; a config file's fields
    are the trainer's to check."""
    config = tmp_path / "typo.py"
    config.write_text(
        "from configs import default\n\n\n"
        "def get_config():\n"
        "    c = default.get_config()\n"
        "    c.num_epoch = 0.25\n"
        "    return c\n"
    )
    result = _train_py(config, tmp_path / "w")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        "train.py: error: config.num_epoch: no such field (did you mean config.num_epochs?)"
    ], result.stderr
    assert not (tmp_path / "w").exists()
