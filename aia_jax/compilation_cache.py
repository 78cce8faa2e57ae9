"""JAX's persistent compilation cache, on by default for the commands.

An attention network's training step compiles in ~36 s on 2 cores (bench/RESULTS.md §4, "Compile
time"), and every start pays it again: a resume after preemption, each evaluation, each
prediction. JAX can keep compiled programs on disk; `train.py` and the evaluate and predict
commands point it at a per-user directory (`default_dir`: `$XDG_CACHE_HOME/aia_jax/xla`, else
`~/.cache/aia_jax/xla`), as MaxText does with `~/jax_cache`, unless told otherwise:

- `JAX_COMPILATION_CACHE_DIR=DIR` (JAX's own variable) uses DIR: on a pod, give a directory
  every host reads, e.g. a bucket, since JAX writes entries from process 0 only;
  `JAX_ENABLE_COMPILATION_CACHE=false` turns the cache off;
- with `--xla_dump_to` in `XLA_FLAGS` it stays off: a program read from the cache is not
  compiled, so it would not be dumped.

On XLA:CPU a program read from the cache also runs faster than one compiled in the same
process: the compiler's freed memory fragments the single malloc arena that
`xla_cpu.retain_host_memory` sets up (bench/RESULTS.md §3, "A compiled program runs faster
from the cache"). So a command that has just compiled its programs into the cache may restart
itself to read them back with a clean heap (`restart_pays`, `restart`; `train.py` does).

Entries are a few MB each (a ResNet-50 training step: 2.7 MB); JAX writes only programs that
took at least a second to compile. Past `MAX_BYTES` JAX evicts the least recently used (with the
`filelock` package, a dependency; without it the cache is unbounded);
`JAX_COMPILATION_CACHE_MAX_SIZE` sets another bound.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping
from typing import NoReturn

import jax
from absl import logging

from aia_jax import xla_cpu

MAX_BYTES = 2 * 2**30
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
# JAX records this one when it writes an entry (not on every miss: a program that compiled in
# under `jax_persistent_cache_min_compile_time_secs` is not written, nor counted).
_WRITE_EVENT = "/jax/compilation_cache/cache_misses"
_counts = {_HIT_EVENT: 0, _WRITE_EVENT: 0}
# Set in the process that `restart` starts, so that it does not restart again.
RESTARTED_ENV = "AIA_JAX_RESTARTED"
# `AIA_JAX_RESTART_AFTER_COMPILE=0` keeps the process that compiled.
RESTART_SWITCH = "AIA_JAX_RESTART_AFTER_COMPILE"


def _count(event: str, **kwargs) -> None:
    if event in _counts:
        _counts[event] += 1


# Counts the programs this process read from or wrote to the persistent cache, however it was
# enabled.
jax.monitoring.register_event_listener(_count)


def hits() -> int:
    """How many compiled programs this process has read from the persistent cache so far."""
    return _counts[_HIT_EVENT]


def writes() -> int:
    """How many compiled programs this process has written to the persistent cache so far."""
    return _counts[_WRITE_EVENT]


def default_dir(environ: Mapping[str, str] = os.environ) -> str:
    """`$XDG_CACHE_HOME/aia_jax/xla`, or `~/.cache/aia_jax/xla` without it."""
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "aia_jax", "xla")


def directory() -> str | None:
    """The persistent cache's directory in this process, or None when it is off."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    return jax.config.jax_compilation_cache_dir or None


def use_default(environ: Mapping[str, str] = os.environ) -> str | None:
    """Points JAX's persistent compilation cache at `default_dir` unless the user chose.

    Leaves everything as it is when `JAX_COMPILATION_CACHE_DIR` is set (whatever its value), a
    cache directory was configured in code, the cache is switched off, or `XLA_FLAGS` asks XLA
    to dump what it compiles. Returns the directory it set, or None.
    """
    if "JAX_COMPILATION_CACHE_DIR" in environ or jax.config.jax_compilation_cache_dir:
        return None
    if not jax.config.jax_enable_compilation_cache:
        return None
    if "--xla_dump_to" in environ.get("XLA_FLAGS", ""):
        return None
    path = default_dir(environ)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        logging.warning("aia_jax: no compilation cache (cannot create %s: %s).", path, e)
        return None
    if not os.access(path, os.W_OK | os.X_OK):
        logging.warning("aia_jax: no compilation cache (%s is not writable).", path)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in environ and importlib.util.find_spec("filelock"):
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path


def restart_pays(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process, having written its programs to the cache, should `restart`.

    On XLA:CPU under `xla_cpu.retain_host_memory`'s single malloc arena the compiler's freed
    memory stays in the arena, fragmented, and every later `malloc` of the steps searches it: a
    program compiled in the process runs 9–13 % (ResNet-50) to 1.7× (the quick start's network)
    slower than the same program read from the cache by a fresh process (bench/RESULTS.md §3,
    "A compiled program runs faster from the cache"). glibc fixes the arena count when the
    first thread starts, and `malloc_trim` does not undo the fragmentation, so only a new
    process image has a clean heap. True for one process on the CPU with the single arena and
    the cache on, unless this process is itself a restart or `AIA_JAX_RESTART_AFTER_COMPILE`
    is 0/false/no/off.
    """
    return (
        directory() is not None
        and xla_cpu.single_arena()
        and not environ.get(RESTARTED_ENV)
        and xla_cpu.switch(environ, RESTART_SWITCH)
        and jax.process_count() == 1
        and jax.default_backend() == "cpu"
    )


def restart() -> NoReturn:
    """Replaces this process by a new run of its own command line (`os.execv`: same PID).

    Only for a command whose command line reproduces its work, and only before it has started
    anything that must end cleanly (worker processes, checkpoint writes): no `finally` or
    `atexit` code runs. The new process has `RESTARTED_ENV` set.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[RESTARTED_ENV] = "1"
    os.execv(sys.executable, sys.orig_argv)
