"""The commands' default persistent compilation cache (`aia_jax.compilation_cache`)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from aia_jax import compilation_cache

# Runs in a fresh process without the suite's cache: uses the default, compiles one program,
# and reports what the module saw.
_CHILD = textwrap.dedent(
    """
    import json, jax, jax.numpy as jnp
    from aia_jax import compilation_cache
    path = compilation_cache.use_default()
    jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
    print(json.dumps({"path": path, "directory": compilation_cache.directory(),
                      "hits": compilation_cache.hits(),
                      "writes": compilation_cache.writes(),
                      "max_size": jax.config.jax_compilation_cache_max_size}))
    """
)


def _child(env: dict[str, str]) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    base["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    out = subprocess.run(
        [sys.executable, "-c", _CHILD],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_default_cache_is_written_then_read_by_the_next_process(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    expected = str(tmp_path / "aia_jax" / "xla")
    first = _child(env)
    assert first["path"] == first["directory"] == expected
    assert first["hits"] == 0 and first["max_size"] == compilation_cache.MAX_BYTES
    entries = [name for name in os.listdir(expected) if name.endswith("-cache")]
    assert entries  # every program of the child, at a minimum compile time of 0 s
    assert first["writes"] == len(entries)
    second = _child(env)
    assert second["hits"] == len(entries) and second["writes"] == 0


def test_the_users_choice_is_left_alone(tmp_path):
    own = tmp_path / "own"
    got = _child({"XDG_CACHE_HOME": str(tmp_path), "JAX_COMPILATION_CACHE_DIR": str(own)})
    assert got["path"] is None and got["directory"] == str(own)
    assert not (tmp_path / "aia_jax").exists()
    off = _child({"XDG_CACHE_HOME": str(tmp_path), "JAX_ENABLE_COMPILATION_CACHE": "false"})
    assert off["path"] is None and off["directory"] is None
    assert not (tmp_path / "aia_jax").exists()


@pytest.fixture
def no_cache_configured():
    """This process with no cache directory configured (the suite configures one)."""
    saved = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)


def test_no_default_when_xla_dumps(tmp_path, no_cache_configured):
    env = {"XDG_CACHE_HOME": str(tmp_path), "XLA_FLAGS": "--xla_dump_to=/tmp/dump"}
    assert compilation_cache.use_default(env) is None
    assert jax.config.jax_compilation_cache_dir is None


def test_no_default_where_the_directory_cannot_be_made(tmp_path, no_cache_configured):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert compilation_cache.use_default({"XDG_CACHE_HOME": str(blocker)}) is None
    assert jax.config.jax_compilation_cache_dir is None


def test_default_dir_without_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compilation_cache.default_dir({}) == str(tmp_path / ".cache" / "aia_jax" / "xla")


def test_restart_pays_only_once_on_the_cpu_with_the_one_arena_and_a_cache(monkeypatch):
    from aia_jax import xla_cpu

    assert compilation_cache.directory()  # the suite's cache (conftest)
    monkeypatch.setattr(xla_cpu, "single_arena", lambda: True)
    assert compilation_cache.restart_pays({})
    assert not compilation_cache.restart_pays({compilation_cache.RESTARTED_ENV: "1"})
    for off in ("0", "false", "off"):
        assert not compilation_cache.restart_pays({compilation_cache.RESTART_SWITCH: off})
    assert compilation_cache.restart_pays({compilation_cache.RESTART_SWITCH: "1"})
    monkeypatch.setattr(xla_cpu, "single_arena", lambda: False)  # glibc's arenas: nothing to gain
    assert not compilation_cache.restart_pays({})
