"""Test-wide set-up: eight fake CPU devices, and one XLA compilation cache for the whole run.

Many tests compile the same programs (the default network's training step, the tiny nets of
the parity tests) in fresh processes or fresh jit objects; JAX's persistent compilation cache
makes every compilation after the first a disk read. Set JAX_COMPILATION_CACHE_DIR to keep a
cache between runs; by default each run starts empty, so the suite tests fresh compiles too.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="aia-jax-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    # Inherited by the subprocesses the trainer tests start.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from aia_jax import xla_cpu  # noqa: E402

# What train.py runs with, so that every result is checked under it: its XLA:CPU flags, and
# glibc keeping the memory XLA:CPU frees between executions instead of faulting fresh pages in
# for every one (bench/RESULTS.md §3). Before any backend starts.
xla_cpu.apply_cpu_flags()
