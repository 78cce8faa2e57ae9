"""The XLA:CPU flags train.py adds: only where safe, never over the user's, and accepted by XLA."""

import os
import subprocess
import sys

import pytest

from aia_jax import xla_cpu

FLAGS = list(xla_cpu.CPU_FLAGS)
SCHEDULER, OTHERS = FLAGS[0], FLAGS[1:]
NAME = SCHEDULER.split("=")[0]
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def measured(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_jaxlib_minor", lambda: xla_cpu.MEASURED_JAXLIB[0])


def test_adds_flags_after_the_users(measured):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_cpu.apply_cpu_flags(env) == FLAGS
    assert env["XLA_FLAGS"] == " ".join(["--xla_force_host_platform_device_count=8", *FLAGS])
    assert xla_cpu.apply_cpu_flags(env) == []  # idempotent


@pytest.mark.parametrize(
    "users",
    [
        f"{NAME}=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
        # The deprecated flag that makes the same choice: adding ours would overrule it.
        "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    ],
)
def test_keeps_a_flag_the_user_set(measured, users):
    # XLA takes the last of two flags that make the same choice: the user's must stay the only one.
    env = {"XLA_FLAGS": users}
    assert xla_cpu.apply_cpu_flags(env) == OTHERS
    assert env["XLA_FLAGS"] == " ".join([users, *OTHERS])


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
    assert [ln[1:] for ln in lines[1:]] == [[t, *FLAGS, "False"] for t in targets]


_FAULTS_PROGRAM = """if True:
    import resource, sys
    from aia_jax import xla_cpu
    applied = xla_cpu.retain_host_memory() if sys.argv[1] == "retain" else False
    import jax, jax.numpy as jnp
    # Temporaries of 64 MiB each, freed after every call, as a training step's are.
    step = jax.jit(lambda x: jnp.cumsum(jnp.exp(x) * 2 + x)[::4].sum())
    x = jnp.ones((1 << 24,), jnp.float32)
    for _ in range(25):  # kept, the heap grows to a plateau over the first calls
        step(x).block_until_ready()
    faults = []
    for _ in range(9):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # The median call: the heap may still grow once or twice more.
    print("FAULTS", applied, sorted(faults)[4])
"""


def _run_program(program: str, *args: str) -> subprocess.CompletedProcess:
    """Runs `program` in a fresh Python with neither XLA flags nor the opt-out set.

    Skips the test where the program exits with "SKIP" (retain_host_memory does not apply).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "AIA_JAX_XLA_CPU_FLAGS")}
    proc = subprocess.run(
        [sys.executable, "-c", program, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "SKIP" in proc.stderr:
        pytest.skip("retain_host_memory does not apply here (not glibc, or an accelerator)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _page_faults(mode: str) -> tuple[str, int]:
    proc = _run_program(_FAULTS_PROGRAM, mode)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("FAULTS"))
    _, applied, faults = line.split()
    return applied, int(faults)


def test_retained_host_memory_is_reused_without_page_faults():
    # XLA:CPU frees each call's temporaries; kept by glibc, the next call faults no page in.
    applied, kept = _page_faults("retain")
    if applied != "True":
        pytest.skip("retain_host_memory does not apply here (not glibc, or an accelerator)")
    _, default = _page_faults("default")
    # A call's >= 64 MiB of fresh 4 KiB pages is > 16,000 faults with glibc's defaults.
    assert default > 10_000, default
    assert kept < default / 20, (kept, default)


# glibc's malloc, free and sbrk(0) (the heap's end) for the programs below.
_LIBC = """
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes, libc.sbrk.restype = [ctypes.c_void_p], ctypes.c_void_p
    libc.sbrk.argtypes = [ctypes.c_long]
"""

_TRIM_PROGRAM = (
    """if True:
    from aia_jax import xla_cpu
    if not xla_cpu.retain_host_memory():
        raise SystemExit("SKIP")
"""
    + _LIBC
    + """
    # More than 2 GiB, as a batch-4 training step's temporaries are; never touched, so it
    # costs address space, not memory.
    block = libc.malloc((1 << 31) + (1 << 28))
    grown = libc.sbrk(0)
    libc.free(block)
    print("HEAP_END", grown, libc.sbrk(0))
"""
)


def test_retained_heap_is_not_trimmed_above_2_gib():
    # glibc stores the trim threshold as a size_t: the largest int, 2 GiB, let a free of a
    # larger block hand it back (and every later step fault it in again).
    proc = _run_program(_TRIM_PROGRAM)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("HEAP_END"))
    grown, after_free = map(int, line.split()[1:])
    assert after_free == grown


_RELEASE_PROGRAM = (
    """if True:
    import time
    from aia_jax import xla_cpu
    if not xla_cpu.retain_host_memory(limit_bytes=1, poll_s=0.02):
        raise SystemExit("SKIP")
"""
    + _LIBC
    + """
    deadline = time.monotonic() + 10
    while xla_cpu._retained and time.monotonic() < deadline:
        time.sleep(0.01)
    before = libc.sbrk(0)
    libc.malloc(64 << 20)  # glibc's default: a block this large is an mmap, not the heap
    print("RELEASED", xla_cpu._retained is False, libc.sbrk(0) == before)
"""
)


def test_kept_heap_is_handed_back_past_its_memory_limit():
    proc = _run_program(_RELEASE_PROGRAM)
    assert "RELEASED True True" in proc.stdout, proc.stdout
    assert "glibc's allocator defaults restored" in proc.stderr, proc.stderr[-2000:]


def test_memory_limit_is_the_machines_or_the_cgroups():
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < xla_cpu.memory_limit() <= physical
    assert 0 < xla_cpu.resident_bytes() < physical


def test_retain_host_memory_only_where_jax_is_cpu_only(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_retained", False)
    calls = []
    monkeypatch.setattr(xla_cpu.ctypes, "CDLL", lambda name: calls.append(name))
    monkeypatch.setattr(xla_cpu, "_cpu_only", lambda: False)
    assert xla_cpu.retain_host_memory() is False and calls == []
    monkeypatch.setattr(xla_cpu, "_cpu_only", lambda: True)
    monkeypatch.setattr(xla_cpu.platform, "libc_ver", lambda: ("musl", ""))
    assert xla_cpu.retain_host_memory() is False and calls == []


def test_cpu_only_sees_accelerator_plugins(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    entry_points, specs = [], set()
    monkeypatch.setattr(xla_cpu.importlib.metadata, "entry_points", lambda group: entry_points[:])
    monkeypatch.setattr(xla_cpu.importlib.util, "find_spec", lambda n: n if n in specs else None)
    assert xla_cpu._cpu_only() is True
    entry_points.append("xla_cuda13 = jax_cuda13_plugin")  # what jax-cuda13-plugin registers
    assert xla_cpu._cpu_only() is False
    entry_points.clear()
    for found in ("jax_plugins", "libtpu"):
        specs.add(found)
        assert xla_cpu._cpu_only() is False
        specs.clear()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    specs.add("libtpu")
    assert xla_cpu._cpu_only() is True


def test_opt_out_keeps_glibc_defaults(monkeypatch):
    calls = []
    monkeypatch.setattr(xla_cpu, "retain_host_memory", lambda: calls.append(1))
    monkeypatch.setattr(xla_cpu, "_backend_started", lambda: False, raising=False)
    monkeypatch.setenv("AIA_JAX_XLA_CPU_FLAGS", "0")
    assert xla_cpu.apply_cpu_flags() == [] and calls == []
    # Its own switch keeps glibc's defaults and still adds the flags.
    monkeypatch.setenv("AIA_JAX_XLA_CPU_FLAGS", "1")
    monkeypatch.setenv("AIA_JAX_RETAIN_HOST_MEMORY", "0")
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(xla_cpu, "_jaxlib_minor", lambda: xla_cpu.MEASURED_JAXLIB[0])
    assert xla_cpu.apply_cpu_flags() == list(xla_cpu.CPU_FLAGS) and calls == []


@pytest.mark.parametrize("off", ["0", "false", "False", "no", "off", " OFF "])
def test_opt_out_spellings(measured, monkeypatch, off):
    calls = []
    monkeypatch.setattr(xla_cpu, "retain_host_memory", lambda: calls.append(1))
    monkeypatch.setattr(xla_cpu, "_backend_started", lambda: False, raising=False)
    env = {"AIA_JAX_XLA_CPU_FLAGS": off}
    assert xla_cpu.apply_cpu_flags(env) == [] and "XLA_FLAGS" not in env
    monkeypatch.setenv("AIA_JAX_XLA_CPU_FLAGS", "")  # empty: the default, on
    monkeypatch.setenv("AIA_JAX_RETAIN_HOST_MEMORY", off)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert xla_cpu.apply_cpu_flags() == FLAGS and calls == []


def test_unknown_switch_value_is_on_with_a_warning(measured, monkeypatch):
    warnings = []
    monkeypatch.setattr(xla_cpu.logging, "warning", lambda msg, *a: warnings.append(msg % a))
    env = {"AIA_JAX_XLA_CPU_FLAGS": "disable"}
    assert xla_cpu.apply_cpu_flags(env) == FLAGS
    assert len(warnings) == 1 and "AIA_JAX_XLA_CPU_FLAGS='disable'" in warnings[0]


def test_keeps_an_xla_flags_file(measured, tmp_path):
    # XLA reads an XLA_FLAGS that does not start with "-" as a file of flags: appending to it
    # made XLA abort ("Could not open file \"<file> --xla_cpu_...\"").
    flag_file = str(tmp_path / "xla_flags.txt")
    env = {"XLA_FLAGS": flag_file}
    assert xla_cpu.apply_cpu_flags(env) == [] and env["XLA_FLAGS"] == flag_file


def test_changes_nothing_once_the_backend_started(measured, monkeypatch):
    # XLA read XLA_FLAGS when the backend started: adding flags then only looks applied.
    import jax

    jax.devices()
    warnings, calls = [], []
    monkeypatch.setattr(xla_cpu.logging, "warning", lambda msg, *a: warnings.append(msg % a))
    monkeypatch.setattr(xla_cpu, "retain_host_memory", lambda: calls.append(1))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("AIA_JAX_XLA_CPU_FLAGS", raising=False)
    assert xla_cpu.apply_cpu_flags() == [] and "XLA_FLAGS" not in os.environ and calls == []
    assert len(warnings) == 1 and "already started" in warnings[0]
    # Nothing missing (the program applied them before JAX started): nothing to warn about.
    monkeypatch.setenv("XLA_FLAGS", " ".join(FLAGS))
    assert xla_cpu.apply_cpu_flags() == [] and len(warnings) == 1
    # An environment for another process is still filled in.
    assert xla_cpu.apply_cpu_flags({}) == FLAGS


_RETAIN_AGAIN_PROGRAM = """if True:
    import time
    from aia_jax import xla_cpu
    if not xla_cpu.retain_host_memory(limit_bytes=1 << 60):
        raise SystemExit("SKIP")
    xla_cpu.release_host_memory()
    # Kept again: a new watchdog must hand the heap back past its (tiny) limit.
    assert xla_cpu.retain_host_memory(limit_bytes=1, poll_s=0.02)
    deadline = time.monotonic() + 10
    while xla_cpu._retained and time.monotonic() < deadline:
        time.sleep(0.01)
    print("RELEASED", xla_cpu._retained is False)
"""


def test_retain_after_release_is_watched_again():
    proc = _run_program(_RETAIN_AGAIN_PROGRAM)
    assert "RELEASED True" in proc.stdout, proc.stdout


_UNREADABLE_STATM_PROGRAM = """if True:
    import time
    from aia_jax import xla_cpu
    if not xla_cpu.retain_host_memory(limit_bytes=1 << 60, poll_s=0.02):
        raise SystemExit("SKIP")
    # /proc/self/statm gone while running: the watchdog cannot bound the heap any more.
    xla_cpu._STATM = "/nonexistent/statm"
    deadline = time.monotonic() + 10
    while xla_cpu._retained and time.monotonic() < deadline:
        time.sleep(0.01)
    print("RELEASED", xla_cpu._retained is False)
    # Unreadable from the start: the heap is not kept at all.
    print("KEPT AGAIN", xla_cpu.retain_host_memory(limit_bytes=1 << 60))
"""


def test_unreadable_resident_set_keeps_no_heap():
    proc = _run_program(_UNREADABLE_STATM_PROGRAM)
    assert "RELEASED True" in proc.stdout and "KEPT AGAIN False" in proc.stdout, proc.stdout
    # The watchdog stopped with a warning, not with a thread's traceback.
    assert "Traceback" not in proc.stderr and "cannot read" in proc.stderr, proc.stderr


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_memory_limit_of_nested_cgroups(monkeypatch, tmp_path):
    # Where /sys/fs/cgroup is the host's (systemd services, Slurm jobs), the process's limit is
    # in its own cgroup's directory or one above it, not in the root's files.
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    root, proc = tmp_path / "cgroup", tmp_path / "proc_self_cgroup"
    monkeypatch.setattr(xla_cpu, "_CGROUP_ROOT", str(root), raising=False)
    monkeypatch.setattr(xla_cpu, "_PROC_CGROUP", str(proc), raising=False)
    assert xla_cpu.memory_limit() == physical  # no files at all
    # v2: no limit on the job step itself ("max"), 1 GiB on the job above it.
    proc.write_text("0::/system.slice/job_7/step_0\n")
    _write(root / "system.slice/job_7/step_0/memory.max", "max\n")
    _write(root / "system.slice/job_7/memory.max", f"{1 << 30}\n")
    assert xla_cpu.memory_limit() == min(physical, 1 << 30)
    # v1: the root's "no limit" is a huge number; the process's cgroup has 512 MiB.
    root, proc = tmp_path / "v1", tmp_path / "proc_self_cgroup_v1"
    monkeypatch.setattr(xla_cpu, "_CGROUP_ROOT", str(root), raising=False)
    monkeypatch.setattr(xla_cpu, "_PROC_CGROUP", str(proc), raising=False)
    proc.write_text("9:name=systemd:/\n4:memory:/process_api/abc\n3:cpuset:/\n0::/\n")
    _write(root / "memory/memory.limit_in_bytes", "9223372036854771712\n")
    _write(root / "memory/process_api/abc/memory.limit_in_bytes", f"{1 << 29}\n")
    assert xla_cpu.memory_limit() == min(physical, 1 << 29)
