"""XLA:CPU settings that the entry points apply before JAX creates its backend.

XLA reads `XLA_FLAGS` once, when the first backend is created, and aborts on a flag it does not
know. So `apply_cpu_flags` runs before anything touches a device, adds only flags that the
installed jaxlib was measured with, and never overrides a flag the user set. It also has glibc's
allocator keep the memory XLA:CPU frees (`retain_host_memory`). `train.py`, the evaluate and
predict commands and the benchmarks call it; set `AIA_JAX_XLA_CPU_FLAGS=0` to run with XLA's
and glibc's defaults, or `AIA_JAX_RETAIN_HOST_MEMORY=0` to keep glibc's alone. Code that imports
the modules into its own program makes these settings itself (README, "What makes this fast on
XLA:CPU").
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys
import threading
from collections.abc import Mapping, MutableMapping

from absl import logging

# Both only affect the CPU compiler (bench/RESULTS.md §5, 2026-12-05). XLA:CPU's default,
# concurrency-optimized scheduler makes a ResNet-50 training step at batch 4 ~10 % slower (the
# deprecated `--xla_cpu_enable_concurrency_optimized_scheduler=false` compiles the same program
# as the memory-optimized one). The fast-compile preset fuses less into each loop, which makes
# the training step 5-8 % and inference 3-4 % faster here; the test suite runs under it.
CPU_FLAGS = (
    "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE",
)
# Other flags that make the same choice: if the user set one, the choice is theirs.
_SAME_CHOICE = {"--xla_cpu_scheduler_type": ("--xla_cpu_enable_concurrency_optimized_scheduler",)}
# jaxlib minor versions on which CPU_FLAGS were checked to exist and to help.
MEASURED_JAXLIB = ("0.10",)


def _jaxlib_minor() -> str | None:
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None
    return ".".join(version.split(".")[:2])


_OFF = ("0", "false", "no", "off")
_ON = ("", "1", "true", "yes", "on")


def switch(environ: Mapping[str, str], name: str) -> bool:
    """Whether the on/off variable `name` is on (unset or empty: on)."""
    value = environ.get(name, "").strip().lower()
    if value in _OFF:
        return False
    if value not in _ON:
        # A typo must not stop a training run; the warning names what was read.
        logging.warning(
            "aia_jax: %s=%r is not one of %s (off) or %s (on); taken as on.",
            name,
            environ[name],
            "/".join(_OFF),
            "/".join(v for v in _ON if v),
        )
    return True


def _backend_started() -> bool:
    """Whether this process's JAX backends exist already (XLA read XLA_FLAGS then)."""
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    # A private function: on a jax without it, assume not started (the behaviour before).
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started is not None and started())


def apply_cpu_flags(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Appends `CPU_FLAGS` to `environ['XLA_FLAGS']` where safe; returns the flags added.

    A flag whose name, or that of a flag making the same choice, already appears in `XLA_FLAGS`
    is left as the user set it (`--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED`
    keeps XLA's default), and so is an `XLA_FLAGS` that names a flag file. Nothing is added for a
    jaxlib outside `MEASURED_JAXLIB`, or when `AIA_JAX_XLA_CPU_FLAGS` is 0/false/no/off. Called
    on the real environment, it also applies `retain_host_memory`, unless
    `AIA_JAX_RETAIN_HOST_MEMORY` is off; there, once JAX's backend has started, it changes
    nothing, with a warning where flags were missing (XLA has read its flags by then).
    """
    if not switch(environ, "AIA_JAX_XLA_CPU_FLAGS"):
        return []
    started = environ is os.environ and _backend_started()
    if environ is os.environ and not started and switch(environ, "AIA_JAX_RETAIN_HOST_MEMORY"):
        retain_host_memory()
    if _jaxlib_minor() not in MEASURED_JAXLIB:
        return []
    current = environ.get("XLA_FLAGS", "")
    if current.strip() and not current.lstrip().startswith("-"):
        # XLA reads such a value as the name of a file of flags; anything appended to it would
        # make XLA look for a file of that longer name and abort.
        return []
    added = []
    for flag in CPU_FLAGS:
        name = flag.split("=")[0]
        if not any(n in current for n in (name, *_SAME_CHOICE.get(name, ()))):
            added.append(flag)
    if added and started:
        # XLA read XLA_FLAGS when the backend started: setting them now would only look applied.
        logging.warning(
            "aia_jax.xla_cpu.apply_cpu_flags: JAX's backend has already started, so %s were "
            "not added (nor the allocator setting); call it before JAX first uses a device.",
            " ".join(added),
        )
        return []
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


# mallopt parameters of glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# mallopt takes an int; glibc stores the threshold as a size_t, so -1 is "never trim" (mallopt(3)).
# The largest positive int, 2 GiB, let glibc trim again once a step's temporaries passed 2 GiB.
_NEVER_TRIM = -1
# glibc's own values, restored by `release_host_memory`.
_GLIBC_MMAP_MAX, _GLIBC_TRIM_THRESHOLD = 65536, 128 * 1024
# The kept heap is a cache: past this share of the memory the process may use, it is handed back.
RETAIN_LIMIT_FRACTION = 0.5
_retained = False
# Set by `release_host_memory` to stop the watchdog; a fresh one per `retain_host_memory`, so a
# retain after a release gets a watchdog again.
_released = threading.Event()


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


_CGROUP_ROOT = "/sys/fs/cgroup"
_PROC_CGROUP = "/proc/self/cgroup"


def _cgroup_limit_files() -> list[str]:
    """The memory-limit files of this process's cgroup and of each cgroup above it (v2, v1).

    The root's files are the limit where /sys/fs/cgroup is the container's own cgroup; where it
    is the host's (systemd services, Slurm jobs), the process's cgroup is a sub-directory named
    in /proc/self/cgroup, and any cgroup above it may hold the lower limit.
    """
    files = [
        os.path.join(_CGROUP_ROOT, "memory.max"),
        os.path.join(_CGROUP_ROOT, "memory", "memory.limit_in_bytes"),
    ]
    try:
        with open(_PROC_CGROUP) as f:
            lines = f.read().splitlines()
    except OSError:
        return files
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:  # v2: one hierarchy, `memory.max`
            base, name = _CGROUP_ROOT, "memory.max"
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            base, name = os.path.join(_CGROUP_ROOT, "memory"), "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p and p != ".."]
        files += [os.path.join(base, *parts[:i], name) for i in range(len(parts), 0, -1)]
    return files


def memory_limit() -> int:
    """Bytes this process may use: the machine's memory, or its cgroups' limit if lower.

    A cgroup without a limit ("max" in v2, a huge number in v1) or a missing file counts as none.
    """
    limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in _cgroup_limit_files():
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit():
            limit = min(limit, int(value))
    return limit


_STATM = "/proc/self/statm"


def resident_bytes() -> int:
    """This process's resident set, from /proc/self/statm."""
    with open(_STATM) as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _resident_bytes_or_none() -> int | None:
    # A /proc mounted with hidepid or missing (some sandboxes) leaves nothing to watch.
    try:
        return resident_bytes()
    except (OSError, ValueError, IndexError):
        return None


def retain_host_memory(limit_bytes: int | None = None, poll_s: float = 0.5) -> bool:
    """Has glibc's malloc keep the memory XLA:CPU frees, for the next step to reuse.

    XLA:CPU allocates each execution's temporaries (about 1 GiB for a ResNet-50 training step
    at batch 1, 3.6 GiB at batch 4) and frees them after it. glibc serves such blocks with fresh
    `mmap`s, or from per-thread arenas that it trims, and hands the pages back on `free`: the
    next step faults every page in again and the kernel zeroes it. Measured on a TSM ResNet-50
    training step (2 cores): 250,000 page faults and ~0.4 s of system time per 1.2 s step at
    batch 1, a million faults and 4–10 s per 9–12 s step at batch 4. With one arena, no `mmap` and
    no trimming there are none once the heap has grown, and training steps run 17–41 % faster
    (bench/RESULTS.md §3, 2026-12-03 and 2026-12-04).

    The price is memory: the process keeps its heap, and the heap grows over the first steps
    because freed blocks do not always fit the next request. In a training loop that
    dispatches steps without waiting (as `train.py` does) it grew by 1.5 (batch 1) to 3 (batch
    4) steps' temporaries over glibc's defaults: TSM ResNet-50 at batch 1, 3.7 GiB resident
    against 2.1 GiB; at batch 4, 11.5–15.4 GiB against 5 GiB. So a daemon thread
    checks the resident set every `poll_s` seconds, and once it passes `limit_bytes` (default:
    `RETAIN_LIMIT_FRACTION` of `memory_limit()`) calls `release_host_memory` and logs a
    warning: the process then runs as with glibc's defaults. `AIA_JAX_RETAIN_HOST_MEMORY=0`
    (read by `apply_cpu_flags`) keeps glibc's defaults from the start. The one arena also keeps
    the compiler's freed memory, fragmented: a program compiled in the process runs 9–13 %
    (ResNet-50) to 1.7× (the quick start's tiny network) slower than the same program read from
    the persistent compilation cache, which the commands therefore use, and `train.py` restarts
    itself once it has compiled its programs, to read them back (`compilation_cache`;
    bench/RESULTS.md §3, sessions 39 and 40).

    Applied once per process, before the backend starts (the arena limit binds threads that
    start later), and only on Linux with glibc where JAX can run on the CPU alone and the
    resident set can be read (without it nothing would bound the heap). Returns whether it
    applied the settings.
    """
    global _retained, _released
    if _retained:
        return True
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or not _cpu_only():
        return False
    if _resident_bytes_or_none() is None:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    _retained = all(mallopt(param, value) == 1 for param, value in settings)
    if _retained:
        _released = threading.Event()
        limit = int(RETAIN_LIMIT_FRACTION * memory_limit()) if limit_bytes is None else limit_bytes
        threading.Thread(
            target=_watch, args=(limit, poll_s, _released), name="aia_jax-host-memory", daemon=True
        ).start()
    return _retained


def _watch(limit: int, poll_s: float, released: threading.Event) -> None:
    while not released.wait(poll_s):
        resident = _resident_bytes_or_none()
        if resident is None:
            release_host_memory()
            logging.warning(
                "aia_jax.xla_cpu: cannot read %s to watch the kept heap; glibc's allocator "
                "defaults restored (slower steps, bounded memory).",
                _STATM,
            )
            return
        if resident > limit:
            release_host_memory()
            logging.warning(
                "aia_jax.xla_cpu: resident memory %.1f GiB passed the %.1f GiB limit of the "
                "kept heap; glibc's allocator defaults restored (slower steps, less memory; "
                "AIA_JAX_RETAIN_HOST_MEMORY=0 starts that way).",
                resident / 2**30,
                limit / 2**30,
            )
            return


def single_arena() -> bool:
    """Whether `retain_host_memory` set glibc's single arena in this process (it stays after
    `release_host_memory`, which cannot undo it, and sets `_released` only after a retain)."""
    return _retained or _released.is_set()


def release_host_memory() -> bool:
    """Undoes `retain_host_memory`: glibc's `mmap` and trimming back, free heap pages returned.

    Blocks allocated from then on are handed back on `free` again; `malloc_trim` returns the
    free pages inside the kept heap at once. (The single arena stays: it binds threads at their
    start.) Returns whether there was anything to undo.
    """
    global _retained
    if not _retained:
        return False
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
    libc.malloc_trim(0)
    _retained = False
    _released.set()
    return True
