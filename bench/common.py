"""Shared pieces of the benchmarks: environment record, timing, and the JAX / PyTorch networks.

The JAX side is `aia_jax.models.create`; the PyTorch side is the independent re-implementation
of the release in `tests/torch_reference.py`, run as the release runs it (eager `model(x)`,
float32 or `torch.autocast('cpu', dtype=torch.bfloat16)`).

Not part of the test suite: nothing here asserts, everything here times.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import datetime
import functools
import importlib
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` from the repository root
    sys.path.insert(0, str(ROOT))

from aia_jax import xla_cpu  # noqa: E402

xla_cpu.apply_cpu_flags()  # the flags train.py runs with; AIA_JAX_XLA_CPU_FLAGS=0 for none

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from aia_jax import models  # noqa: E402

NUM_CLASSES = 174
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Forms and placements the benchmarks know; the release has no I3D (no PyTorch numbers there).
FORMS = ("C2D", "TSM", "I3D")
TORCH_FORMS = ("C2D", "TSM")


def model_name(form: str, placement: str) -> str:
    """`TSM` + `CinST` → `TSM_CinST_BN`; `none` is the plain backbone."""
    return form if placement == "none" else f"{form}_{placement}_BN"


# --- environment ----------------------------------------------------------------------------


def cpu_model() -> str:
    """`Model name` of lscpu, e.g. 'AMD EPYC'."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def environment() -> dict[str, Any]:
    """Machine, versions, date and load: recorded beside every table."""
    import flax
    import jaxlib

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": os.getloadavg(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def print_environment(info: dict[str, Any]) -> None:
    print("| key | value |\n|---|---|")
    for k, v in info.items():
        print(f"| {k} | {v} |")
    print()


# --- peak FLOP/s (for MFU) ------------------------------------------------------------------

# Dense peak of one accelerator, FLOP/s, by dtype (vendor data sheets, SXM parts, no sparsity).
GPU_PEAKS = {
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
}


def _cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return ""


def _cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def _cpu_mhz() -> float:
    try:
        return float(_cpuinfo("cpu MHz"))
    except ValueError:
        return float("nan")


def cpu_flop_per_cycle() -> tuple[int, str]:
    """float32 FLOP per cycle and core of the FMA units, and which units those are.

    2 FMA pipes × lanes × 2. AMD's Zen 4 (family 25) runs AVX-512 on 256-bit pipes: 8 lanes,
    as for AVX2; Intel's AVX-512 server cores and Zen 5 (family 26) have 16.
    """
    flags = _cpu_flags()
    if "avx512f" in flags:
        if _cpuinfo("vendor_id") == "AuthenticAMD" and _cpuinfo("cpu family") == "25":
            return 32, "AMD Zen 4: AVX-512 on 256-bit FMA pipes"
        return 64, "AVX-512 FMA"
    if "avx2" in flags:
        return 32, "AVX2 FMA"
    return 8, "SSE"


def assumed_peak(dtype: str, override_tflops: float | None = None) -> tuple[float, str]:
    """Peak FLOP/s assumed for MFU, and how it was derived (printed beside the tables).

    CPU: cores × clock × FLOP/cycle, with 2 FMA pipes × 16 float32 lanes × 2 = 64 FLOP/cycle
    per core for AVX-512 (32 for AVX2, and for AMD Zen 4's AVX-512: `cpu_flop_per_cycle`) and
    the clock /proc/cpuinfo reports (the TSC rate in a VM: boost clocks above it would make the
    true peak higher). The same figure is used for
    bf16: XLA:CPU's bf16 kernels are not assumed to double the rate.
    """
    if override_tflops:
        return override_tflops * 1e12, f"given: {override_tflops} TFLOP/s"
    if jax.default_backend() == "gpu":
        kind = jax.devices()[0].device_kind
        for name, peaks in GPU_PEAKS.items():
            if name in kind:
                return peaks[dtype], f"{kind}: {peaks[dtype] / 1e12:g} TFLOP/s dense {dtype}"
        return float("nan"), f"{kind}: unknown peak (pass --peak-tflops)"
    per_cycle, units = cpu_flop_per_cycle()
    cores, mhz = os.cpu_count() or 1, _cpu_mhz()
    peak = cores * mhz * 1e6 * per_cycle
    how = f"{cores} cores × {mhz / 1e3:.2f} GHz × {per_cycle} FLOP/cycle ({units})"
    how += f" = {peak / 1e9:.0f} GFLOP/s"
    return peak, how


# --- timing ---------------------------------------------------------------------------------


def median_ms(times: Sequence[float]) -> float:
    return float(np.median(times)) * 1e3


def min_ms(times: Sequence[float]) -> float:
    return float(np.min(times)) * 1e3


def interleaved(
    fns: dict[str, Callable[[], Any]], warmup: int, reps: int
) -> dict[str, list[float]]:
    """Wall-clock seconds of each function, run round-robin so that load changes hit all alike.

    Every function must block until its result is ready.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def paired_overhead(times: Sequence[float], base: Sequence[float], confidence: float = 0.9):
    """Overhead of `times` over `base` in %, from the ratio of each round's pair of runs.

    `interleaved` times one run of each function per round, so a round's two runs share the
    machine's load of that moment; their ratio cancels slow drifts that ratios of medians do
    not. Returns the median ratio and a distribution-free `confidence` interval for it (the
    order statistics that a Binomial(n, 1/2) count puts the median between), as percentages;
    the interval is (nan, nan) with fewer than 5 rounds, where none exists at 90 %.
    """
    ratios = np.sort(np.asarray(times) / np.asarray(base))
    n = len(ratios)
    median = 100 * (float(np.median(ratios)) - 1)
    # Largest k with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2: the CI is [r_k, r_(n-1-k)].
    tail, k, cdf = (1 - confidence) / 2, -1, 0.0
    while cdf + math.comb(n, k + 1) / 2**n <= tail:
        k += 1
        cdf += math.comb(n, k) / 2**n
    if k < 0:
        return median, float("nan"), float("nan")
    return median, 100 * (float(ratios[k]) - 1), 100 * (float(ratios[n - 1 - k]) - 1)


def fmt_overhead(median: float, lo: float, hi: float) -> str:
    """`+5.1 % [-0.1, +9.3]`; the interval as `[–]` where there were too few rounds for one."""
    ci = "[–]" if np.isnan(lo) else f"[{lo:+.1f}, {hi:+.1f}]"
    return f"{median:+.1f} % {ci}"


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _malloc_in_use() -> int:
    """Bytes the C heap has handed out and not taken back (glibc `mallinfo2`), or -1."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return -1
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


@contextlib.contextmanager
def heap_peak() -> Iterator[dict[str, int]]:
    """Samples the C heap in use every millisecond; yields {'base', 'peak'} bytes.

    Used for PyTorch, whose CPU allocator keeps no peak counter (and whose freed blocks glibc
    keeps, so the resident set does not show a step's activations). `peak - base` is what a
    step allocates on top of what was live before it: activations, gradients, workspace.
    """
    out = {"base": _malloc_in_use(), "peak": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out["peak"] = max(out["peak"], _malloc_in_use())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out["peak"] = max(out["peak"], _malloc_in_use())


# --- JAX ------------------------------------------------------------------------------------


def jax_clips(batch: int, frames: int, size: int, seed: int = 0) -> jax.Array:
    x = np.random.default_rng(seed).normal(size=(batch, frames, size, size, 3))
    return jnp.asarray(x, jnp.float32)


def jax_model(
    name: str,
    dtype: str,
    frames: int = 8,
    impl: str | None = None,
    remat: bool = False,
    package: Any = models,
) -> models.VideoNet:
    """The network of `name`; `impl` is its attention computation (None: the library default).

    `package`: the `models` package to build it from (`baseline_models`: another checkout's).
    """
    return package.create(
        name,
        num_classes=NUM_CLASSES,
        num_segments=frames,
        dtype=DTYPES[dtype],
        attention_impl=impl or package.DEFAULT_IMPL,
        remat=remat,
    )


def scratch_dir(prefix: str) -> Path:
    """A new temporary directory, removed when the process exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


_IMPORT_OF_THE_PACKAGE = re.compile(r"^(\s*)(from|import)\s+aia_jax(?=[.\s])", re.MULTILINE)


def baseline_models(checkout: str) -> Any:
    """`aia_jax.models` of another checkout (e.g. a `git worktree` of an older commit), beside
    this one's in the same process, so that an A/B of a network is timed round-robin.

    The checkout's `aia_jax` is copied to a temporary directory as the package
    `aia_jax_baseline`, its own imports of `aia_jax` renamed, and imported from there.
    """
    source = Path(checkout) / "aia_jax"
    if not (source / "models" / "__init__.py").is_file():
        raise FileNotFoundError(f"no aia_jax/models/__init__.py in {checkout}")
    root = scratch_dir("aia_jax_baseline_")
    copy = root / "aia_jax_baseline"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for path in copy.rglob("*.py"):
        text = path.read_text("utf-8")
        path.write_text(_IMPORT_OF_THE_PACKAGE.sub(r"\1\2 aia_jax_baseline", text), "utf-8")
    sys.path.insert(0, str(root))
    return importlib.import_module("aia_jax_baseline.models")


def jax_variables(model: models.VideoNet, clips: jax.Array) -> Any:
    return jax.jit(lambda k: model.init(k, clips[:1], train=False))(jax.random.key(0))


def compile_timed(
    fn: Callable, *args: Any, compiler_options: dict[str, Any] | None = None, **jit_kw: Any
):
    """`jax.jit(fn).lower(*args).compile(compiler_options)` and the seconds it took.

    `compiler_options` are XLA debug options (`XLA_FLAGS` names without the dashes) for this
    program alone, so that two settings can be timed side by side in one process.
    """
    t0 = time.perf_counter()
    compiled = jax.jit(fn, **jit_kw).lower(*args).compile(compiler_options)
    return compiled, time.perf_counter() - t0


def cost(compiled: Any) -> dict[str, float]:
    """FLOPs and bytes of XLA's cost analysis, and the compiled memory footprint."""
    ca = compiled.cost_analysis()
    if isinstance(ca, list | tuple):  # older jax returned one dict per device
        ca = ca[0]
    out = {"flops": float(ca.get("flops", float("nan")))}
    try:
        ma = compiled.memory_analysis()
        out["temp_bytes"] = float(ma.temp_size_in_bytes)
        out["arg_bytes"] = float(ma.argument_size_in_bytes)
        out["out_bytes"] = float(ma.output_size_in_bytes)
        out["alias_bytes"] = float(ma.alias_size_in_bytes)
        out["peak_bytes"] = out["temp_bytes"] + out["arg_bytes"] + out["out_bytes"]
        out["peak_bytes"] -= out["alias_bytes"]
    except (AttributeError, NotImplementedError):
        pass
    return out


def inference_fn(model: models.VideoNet) -> Callable:
    return lambda variables, clips: model.apply(variables, clips, train=False)


def train_step_fn(model: models.VideoNet, lr: float = 0.01) -> Callable:
    """One SGD step (momentum 0.9, weight decay 1e-4, as the release) on cross-entropy.

    State `(params, batch_stats, momentum, rng)`; meant to be jitted with the state donated.
    """

    def loss_fn(params, batch_stats, clips, labels, rng):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            clips,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": rng},
        )
        logp = jax.nn.log_softmax(logits)
        loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
        return loss, updates["batch_stats"]

    def step(state, clips, labels):
        params, batch_stats, momentum, rng = state
        rng, sub = jax.random.split(rng)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, batch_stats), grads = grad_fn(params, batch_stats, clips, labels, sub)
        momentum = jax.tree_util.tree_map(
            lambda m, g, p: 0.9 * m + g + 1e-4 * p, momentum, grads, params
        )
        params = jax.tree_util.tree_map(lambda p, m: p - lr * m, params, momentum)
        return (params, batch_stats, momentum, rng), loss

    return step


def compiled_runner(
    model: models.VideoNet,
    variables: Any,
    clips: jax.Array,
    labels: jax.Array,
    mode: str,
    compiler_options: dict[str, Any] | None = None,
) -> tuple[Callable[[], Any], Any, float]:
    """Compiles inference (`mode='infer'`) or one training step ('train', state donated).

    Returns a callable that runs it once and blocks, the compiled executable (for `cost`), and
    the compile seconds. The training callable carries its state from call to call; `run(n)`
    dispatches n steps back to back, as a training loop does, and blocks after the last.
    `compiler_options`: XLA options for this program only (`compile_timed`).
    """
    if mode == "infer":
        compiled, secs = compile_timed(
            inference_fn(model), variables, clips, compiler_options=compiler_options
        )
        return (lambda: compiled(variables, clips).block_until_ready()), compiled, secs
    box = [train_state(variables)]
    compiled, secs = compile_timed(
        train_step_fn(model),
        box[0],
        clips,
        labels,
        compiler_options=compiler_options,
        donate_argnums=(0,),
    )

    def run(steps: int = 1) -> None:
        for _ in range(steps):
            box[0], loss = compiled(box[0], clips, labels)
        jax.block_until_ready((box[0], loss))

    return run, compiled, secs


def train_state(variables: Any) -> tuple:
    """A fresh (copied) training state: the step donates it, `variables` stay usable."""
    params = jax.tree_util.tree_map(jnp.copy, variables["params"])
    batch_stats = jax.tree_util.tree_map(jnp.copy, variables["batch_stats"])
    momentum = jax.tree_util.tree_map(jnp.zeros_like, params)
    return (params, batch_stats, momentum, jax.random.key(1))


# --- PyTorch --------------------------------------------------------------------------------


@functools.cache
def torch_device() -> str:
    """Where the PyTorch side runs: 'cuda' when JAX runs on a GPU and PyTorch sees one, else 'cpu'.

    Both frameworks of a table then run on the same device, so every ratio compares like with
    like. On CUDA the reference runs as the release's training script runs it: cuDNN's
    autotuner on (`cudnn.benchmark`), PyTorch's default TF32 convolutions, NCHW tensors.
    """
    import torch

    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return "cuda"
    return "cpu"


def torch_model(name: str, frames: int = 8):
    from tests import torch_reference

    model = torch_reference.build(name, NUM_CLASSES, num_segments=frames, depth=50)
    return model.to(torch_device())


def torch_clips(batch: int, frames: int, size: int, seed: int = 0):
    import torch

    x = np.random.default_rng(seed).normal(size=(batch, frames, 3, size, size))
    return torch.from_numpy(x.astype(np.float32)).to(torch_device())


def torch_labels(batch: int):
    import torch

    return (torch.arange(batch) % NUM_CLASSES).to(torch_device())


def _torch_sync(device: str) -> None:
    """Waits for the device's queued work: CUDA kernels run asynchronously to Python."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def torch_inference(model, clips, dtype: str) -> Callable[[], Any]:
    import torch

    model.eval()

    def run():
        with torch.no_grad(), _autocast(dtype, clips.device.type):
            out = model(clips)
        _torch_sync(clips.device.type)
        return out

    return run


def torch_train_step(model, clips, labels, dtype: str) -> Callable[[], Any]:
    import torch

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def run():
        opt.zero_grad(set_to_none=True)
        with _autocast(dtype, clips.device.type):
            logits = model(clips)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        opt.step()
        return loss.item()  # waits for the step, on CUDA too

    return run


def torch_memory_growth(fn: Callable[[], Any]) -> int:
    """Bytes one call of `fn` allocates on top of what was live before it.

    CUDA: the caching allocator's peak over the call (`max_memory_allocated`). CPU: the C heap
    sampled every millisecond (`heap_peak`), since PyTorch's CPU allocator keeps no peak.
    """
    import torch

    if torch_device() == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    with heap_peak() as mem:
        fn()
    return mem["peak"] - mem["base"]


def _autocast(dtype: str, device: str = "cpu"):
    import torch

    if dtype == "bfloat16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- command line ---------------------------------------------------------------------------


def csv(values: str) -> list[str]:
    return [v for v in values.split(",") if v]


def ints(values: str) -> list[int]:
    """`1,2,4` → [1, 2, 4]: positive integers separated by commas (an argparse `type`)."""
    try:
        out = [int(v) for v in csv(values)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{values!r}: expected integers, e.g. 1,2") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{values!r}: expected integers of at least 1")
    return out


def check_choices(parser, flag: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    """A one-line usage error unless `values` are `allowed` names, at least one, each once."""
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        got = f"unknown {','.join(bad)}" if bad else "nothing given"
        parser.error(f"{flag}: {got}; choose from {','.join(allowed)}")
    if len(set(values)) != len(values):
        parser.error(f"{flag}: each once, got {','.join(values)}")


def check_at_least(parser, args, minimum: int, *names: str) -> None:
    """A one-line usage error unless each integer flag `names` is at least `minimum`."""
    for name in names:
        if getattr(args, name) < minimum:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag}: expected at least {minimum}, got {getattr(args, name)}")


def add_common_flags(parser, *, impl: bool = True, timing: bool = True) -> None:
    """The flags every benchmark takes, so that one command runs on CPU and on GPU alike.

    `impl=False` leaves out `--impl` (for scripts that take several, `--impls`; argparse then
    reads `--impl` as its abbreviation); `timing=False` leaves out the flags of timed scripts.
    Call `check_common_flags` on the parsed arguments.
    """
    parser.add_argument("--forms", type=csv, default=list(FORMS), help=",".join(FORMS))
    parser.add_argument(
        "--placements", type=csv, default=["none", "CinST", "STinC"], help="none,CinST,STinC,…"
    )
    parser.add_argument("--dtype", type=csv, default=["float32", "bfloat16"], help=",".join(DTYPES))
    parser.add_argument("--batch-sizes", type=ints, default=[1, 2], help="e.g. 1,2")
    if timing:
        parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
        # Rounds before timing: with the host memory kept (xla_cpu.retain_host_memory), the heap
        # grows over the first steps of every program in the process before each step reuses it.
        parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    if impl:
        parser.add_argument(
            "--impl", default=models.DEFAULT_IMPL, choices=models.IMPLS, help="JAX attention impl"
        )
    if timing:
        parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
        parser.add_argument(
            "--peak-tflops", type=float, default=None, help="TFLOP/s for MFU (default: assumed)"
        )
    parser.add_argument("--json", default=None, help="append raw results (JSON lines) here")


def check_common_flags(parser, args) -> None:
    """One-line usage errors for the common flags' values (before anything is compiled)."""
    check_choices(parser, "--forms", args.forms, FORMS)
    check_choices(parser, "--placements", args.placements, list(models.PLACEMENTS))
    check_choices(parser, "--dtype", args.dtype, list(DTYPES))
    check_at_least(parser, args, 1, "frames", "size")
    if hasattr(args, "reps"):
        check_at_least(parser, args, 1, "reps")
    if hasattr(args, "warmup"):
        check_at_least(parser, args, 0, "warmup")
