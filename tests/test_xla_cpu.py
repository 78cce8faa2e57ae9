"""The XLA:CPU flags train.py adds: only where safe, never over the user's, and accepted by XLA."""

import os
import subprocess
import sys

import pytest

from aia_jax import xla_cpu

FLAG = xla_cpu.CPU_FLAGS[0]
NAME = FLAG.split("=")[0]
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def measured(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_jaxlib_minor", lambda: xla_cpu.MEASURED_JAXLIB[0])


def test_adds_flags_after_the_users(measured):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_cpu.apply_cpu_flags(env) == [FLAG]
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
    assert xla_cpu.apply_cpu_flags(env) == []  # idempotent


def test_keeps_a_flag_the_user_set(measured):
    env = {"XLA_FLAGS": f"{NAME}=true"}
    assert xla_cpu.apply_cpu_flags(env) == []
    assert env["XLA_FLAGS"] == f"{NAME}=true"


def test_opt_out_and_unmeasured_jaxlib(measured, monkeypatch):
    env = {"AIA_JAX_XLA_CPU_FLAGS": "0"}
    assert xla_cpu.apply_cpu_flags(env) == [] and "XLA_FLAGS" not in env
    monkeypatch.setattr(xla_cpu, "_jaxlib_minor", lambda: "99.0")
    env = {}
    assert xla_cpu.apply_cpu_flags(env) == [] and "XLA_FLAGS" not in env


def test_installed_jaxlib_accepts_the_flags():
    # XLA aborts on a flag it does not know: if this jaxlib is in MEASURED_JAXLIB, its XLA must
    # run a computation with the flags set.
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    added = xla_cpu.apply_cpu_flags(env)
    if not added:
        pytest.skip(f"jaxlib {xla_cpu._jaxlib_minor()} is not in MEASURED_JAXLIB")
    code = "import jax, jax.numpy as jnp; print(float(jax.jit(lambda x: x * 2)(jnp.ones(()))))"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "2.0"


def test_commands_apply_the_flags_before_the_backend_starts():
    # Each command run as a program gets the flags before any device exists; importing its
    # module as a library sets nothing.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "AIA_JAX_XLA_CPU_FLAGS")}
    if not xla_cpu.apply_cpu_flags(dict(env)):
        pytest.skip(f"jaxlib {xla_cpu._jaxlib_minor()} is not in MEASURED_JAXLIB")
    code = """if True:
        import contextlib, io, os, runpy, sys
        import aia_jax.evaluate, aia_jax.predict
        from jax._src import xla_bridge
        print("IMPORTED", os.environ.get("XLA_FLAGS", ""))
        for target in sys.argv[1:]:
            os.environ.pop("XLA_FLAGS", None)
            sys.argv = [target, "--help"]
            with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
                if target.endswith(".py"):
                    runpy.run_path(target, run_name="__main__")
                else:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
            flags = os.environ.get("XLA_FLAGS", "")
            print("RAN", target, flags, xla_bridge.backends_are_initialized())
    """
    targets = ["aia_jax.evaluate", "aia_jax.predict", os.path.join(_REPO, "train.py")]
    proc = subprocess.run(
        [sys.executable, "-c", code, *targets],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=_REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln.split(" ") for ln in proc.stdout.splitlines() if ln.startswith(("IMPORTED", "RAN"))]
    assert lines[0] == ["IMPORTED", ""]
    assert [ln[1:] for ln in lines[1:]] == [[t, FLAG, "False"] for t in targets]
