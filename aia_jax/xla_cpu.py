"""XLA:CPU settings that the entry points apply before JAX creates its backend.

XLA reads `XLA_FLAGS` once, when the first backend is created, and aborts on a flag it does not
know. So `apply_cpu_flags` runs before anything touches a device, adds only flags that the
installed jaxlib was measured with, and never overrides a flag the user set. `train.py` and
the benchmarks call it; set `AIA_JAX_XLA_CPU_FLAGS=0` to run with XLA's defaults. Code that
imports the modules into its own program sets `XLA_FLAGS` itself (README, "Speed").
"""

from __future__ import annotations

import importlib.metadata
import os
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
    when `AIA_JAX_XLA_CPU_FLAGS=0`.
    """
    if environ.get("AIA_JAX_XLA_CPU_FLAGS", "1") == "0" or _jaxlib_minor() not in MEASURED_JAXLIB:
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [f for f in CPU_FLAGS if f.split("=")[0] not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
