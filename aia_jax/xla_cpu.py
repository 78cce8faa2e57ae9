"""XLA:CPU settings that the entry points apply before JAX creates its backend.

XLA reads `XLA_FLAGS` once, when the first backend is created, and aborts on a flag it does not
know. So `apply_cpu_flags` runs before anything touches a device, adds only flags that the
installed jaxlib was measured with, and never overrides a flag the user set. It also has glibc's
allocator keep the memory XLA:CPU frees (`retain_host_memory`). `train.py`, the evaluate and
predict commands and the benchmarks call it; set `AIA_JAX_XLA_CPU_FLAGS=0` to run with XLA's
and glibc's defaults. Code that imports the modules into its own program makes these settings
itself (README, "Speed").
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import MutableMapping

# XLA:CPU's concurrency-optimized scheduler runs the stride-2 convolution gradients of a
# ResNet-50 training step at batch > 1 up to 27x slower (bench/RESULTS.md §3); it only affects
# the CPU compiler.
CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)
# jaxlib minor versions on which CPU_FLAGS were checked to exist and to help.
MEASURED_JAXLIB = ("0.10",)


def _jaxlib_minor() -> str | None:
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None
    return ".".join(version.split(".")[:2])


def apply_cpu_flags(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Appends `CPU_FLAGS` to `environ['XLA_FLAGS']` where safe; returns the flags added.

    A flag whose name already appears in `XLA_FLAGS` is left as the user set it (set it to
    `true` to keep XLA's default). Nothing is added for a jaxlib outside `MEASURED_JAXLIB`, or
    when `AIA_JAX_XLA_CPU_FLAGS=0`. Called on the real environment, it also applies
    `retain_host_memory`.
    """
    if environ.get("AIA_JAX_XLA_CPU_FLAGS", "1") == "0":
        return []
    if environ is os.environ:
        retain_host_memory()
    if _jaxlib_minor() not in MEASURED_JAXLIB:
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [f for f in CPU_FLAGS if f.split("=")[0] not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


# mallopt parameters of glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_retained = False


def _cpu_only() -> bool:
    """Whether JAX runs on the host CPU alone here: JAX_PLATFORMS=cpu, or no other backend.

    JAX finds GPU and other PJRT plugins through the `jax_plugins` entry points and namespace
    package (jax-cuda*-plugin, jax-rocm*-plugin, …) and TPUs through `libtpu`; none of them is
    imported here.
    """
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return True
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    return importlib.util.find_spec("jax_plugins") is None and (
        importlib.util.find_spec("libtpu") is None
    )


def retain_host_memory() -> bool:
    """Has glibc's malloc keep the memory XLA:CPU frees, for the next step to reuse.

    XLA:CPU allocates each execution's temporaries (about 1 GiB for a ResNet-50 training step)
    and frees them after it. glibc serves such blocks with fresh `mmap`s, or from per-thread
    arenas that it trims, and hands the pages back on `free`: the next step faults every page in
    again and the kernel zeroes it. Measured on a TSM ResNet-50 training step (2 cores, batch
    1): 250,000 page faults and ~0.4 s of system time per 1.2 s step; with one arena, no `mmap`
    and no trimming, none, and the step 18 % faster side by side (bench/RESULTS.md §3, "Paired
    intervals, and the page faults…"). The price is that the process keeps its peak heap, as
    PyTorch's and JAX's GPU allocators keep theirs, and that the heap grows to a plateau over
    the first steps (freed blocks do not always fit the next request): a TSM_CinST_BN training
    loop with evaluation passes stayed at 3.7 GiB resident from step 10 to 60, against a 3.5 GiB
    peak with glibc's defaults.

    Applied once per process, before the backend starts (the arena limit binds threads that
    start later), and only on Linux with glibc where JAX can run on the CPU alone. Returns
    whether it applied the settings.
    """
    global _retained
    if _retained:
        return True
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or not _cpu_only():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    _retained = all(mallopt(param, value) == 1 for param, value in settings)
    return _retained
