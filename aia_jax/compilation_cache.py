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
from the cache").

Entries are a few MB each (a ResNet-50 training step: 2.7 MB); JAX writes only programs that
took at least a second to compile. Past `MAX_BYTES` JAX evicts the least recently used (with the
`filelock` package, a dependency; without it the cache is unbounded);
`JAX_COMPILATION_CACHE_MAX_SIZE` sets another bound.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

import jax
from absl import logging

MAX_BYTES = 2 * 2**30
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_hits = 0


def _count_hit(event: str, **kwargs) -> None:
    global _hits
    if event == _HIT_EVENT:
        _hits += 1


# Counts the programs this process read from the persistent cache, however it was enabled.
jax.monitoring.register_event_listener(_count_hit)


def hits() -> int:
    """How many compiled programs this process has read from the persistent cache so far."""
    return _hits


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
