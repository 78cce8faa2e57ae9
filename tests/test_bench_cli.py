"""Cheap checks of the benchmark scripts under bench/: their command lines and table formulas.

Nothing here compiles a network or times anything: bad arguments must stop with a one-line
usage error before any work, the tables' derived columns must follow from the raw numbers,
bench/gpu_session.sh must call only flags its scripts take, and the C++ kernels that
bench/ffi_pool.py times must compute what they are timed against.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import checkpoint_save  # noqa: E402
import common  # noqa: E402
import compile_time  # noqa: E402
import ffi_pool  # noqa: E402
import first_run  # noqa: E402
import flops  # noqa: E402
import overhead  # noqa: E402
import step  # noqa: E402
import unit  # noqa: E402


def _usage_error(module, *argv: str) -> str:
    """Runs `module.main()` on `argv`; returns its stderr, which must be a usage error."""
    err = io.StringIO()
    old = sys.argv
    sys.argv = [f"{module.__name__}.py", *argv]
    try:
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
            module.main()
    finally:
        sys.argv = old
    assert exit_info.value.code == 2, err.getvalue()
    return err.getvalue().strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        (step, ["--dtype", "float16"], "--dtype: unknown float16"),
        (step, ["--forms", "X3D"], "--forms: unknown X3D"),
        (step, ["--modes", "infer,eval"], "--modes: unknown eval"),
        (step, ["--torch-dtypes", "float16"], "--torch-dtypes: unknown float16"),
        (step, ["--batch-sizes", "0"], "expected integers of at least 1"),
        (step, ["--reps", "0"], "--reps: expected at least 1"),
        (overhead, ["--impls", "xla,fast"], "--impls: unknown fast"),
        (overhead, ["--placements", "none,CinSt"], "--placements: unknown CinSt"),
        (overhead, ["--compiler-options", "novalue"], "expected KEY=VALUE"),
        (overhead, ["--placements", "none,CinST,none"], "--placements: each once"),
        (flops, ["--impls", "fast"], "--impls: unknown fast"),
        (unit, ["--units", "CinST,X"], "--units: unknown X"),
        (unit, ["--dtype", "float16"], "invalid choice"),
        (first_run, ["--rounds", "0"], "--rounds: expected at least 1"),
        (checkpoint_save, ["--rounds", "0"], "--rounds: expected at least 1"),
        (checkpoint_save, ["--saves", "1"], "--saves: expected at least 2"),
        (checkpoint_save, ["--depth", "34"], "invalid choice"),
        (compile_time, ["--modes", "eval"], "--modes: unknown eval"),
        (compile_time, ["--reps", "0"], "--reps: expected at least 1"),
        (compile_time, ["--dtype", "float32,bfloat16"], "--dtype: one value expected"),
        (compile_time, ["--baseline", "/nonexistent"], "no aia_jax/models/fused.py there"),
        (step, ["--baseline", "/nonexistent"], "--baseline: no aia_jax/models/__init__.py in"),
        (unit, ["--baseline", "/nonexistent"], "--baseline: no aia_jax/models/__init__.py in"),
        (ffi_pool, ["--reps", "0"], "--reps: expected at least 1"),
    ],
)
def test_bad_arguments_give_one_usage_line(module, argv, message):
    assert message in _usage_error(module, *argv)


def test_ffi_pool_without_a_compiler_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    assert "no C++ compiler: set CXX" in _usage_error(ffi_pool)


@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 19), (1, 8, 7, 7, 32)])
def test_ffi_pool_kernels_equal_fused(shape):
    """Pools (ties included) and the product's gradient, over a channel tail and whole vectors."""
    if ffi_pool.compiler() is None or jax.default_backend() != "cpu":
        pytest.skip("the kernels are built with the host's C++ compiler, for the CPU backend")
    ffi_pool.load(ffi_pool.compiler())
    ffi_pool.check(shape)


def test_compile_time_table_takes_medians_per_checkout(capsys):
    def row(trace, phases=None):
        return {"trace_s": trace, "lower_s": 1.0, "compile_s": 10.0, "hlo_instructions": 7} | (
            phases or {}
        )

    results = {
        ("TSM", "train", "/old"): [row(3.0), row(5.0), row(4.0)],
        ("TSM", "train", str(compile_time.ROOT)): [row(2.0, {"HLO passes": 1.5}), row(2.0)],
    }
    args = type("Args", (), {"phases": True, "reps": 3})
    compile_time.print_table(results, args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == "| TSM | train | baseline | 4.0 | 1.0 | 10.0 | 15.0 | – | – | – | – | 7 |"
    assert lines[-1] == "| TSM | train | this | 2.0 | 1.0 | 10.0 | 13.0 | 1.5 | – | – | – | 7 |"
    assert lines[-3].count("|") == lines[-1].count("|")


def test_first_run_reads_the_trainers_program_lines():
    printed = (
        "Compiling the training step, evaluation step and initial state (or reading them from d).\n"
        "Training step compiled in 18.7 s.\nEvaluation step compiled in 4.4 s.\n"
        "Initial state compiled in 7.9 s.\nRestarting to run them from the cache: …\n"
        "Training step read from the cache in 3.3 s.\n"
    )
    assert first_run.programs_of(printed) == (
        "training c 18.7, evaluation c 4.4, initial c 7.9, training r 3.3"
    )


def test_overhead_reads_impl_as_impls():
    """`--impl` would be ignored by a script that takes `--impls`: argparse abbreviates it."""
    assert "--size: expected at least 1" in _usage_error(overhead, "--impl", "xla", "--size", "0")


def test_common_csv_and_ints():
    assert common.csv("a,,b") == ["a", "b"]
    assert common.ints("1,2,8") == [1, 2, 8]
    assert overhead._compiler_options("--a=1,b=x") == {"a": "1", "b": "x"}
    assert overhead._compiler_options("a=dot,reduce,b=2") == {"a": "dot,reduce", "b": "2"}


def test_paired_overhead():
    median, lo, hi = common.paired_overhead([1.1] * 5, [1.0] * 5)
    assert median == pytest.approx(10) and lo == pytest.approx(10) and hi == pytest.approx(10)
    # Five rounds: the 90 % interval is [min, max] of the ratios (coverage 1 - 2/32).
    median, lo, hi = common.paired_overhead([1.0, 1.1, 1.2, 1.3, 1.5], [1.0] * 5)
    assert (median, lo, hi) == pytest.approx((20, 0, 50))
    assert all(math.isnan(v) for v in common.paired_overhead([1.1] * 4, [1.0] * 4)[1:])
    assert common.fmt_overhead(5.06, float("nan"), float("nan")) == "+5.1 % [–]"


def test_step_table_columns():
    row = {
        "form": "TSM", "placement": "CinST", "dtype": "bfloat16", "batch": 4, "mode": "train",
        "jax_ms_median": 200.0, "jax_ms_min": 190.0, "compile_s": 12.0, "flops": 1e12,
        "peak_bytes": 2**30, "temp_bytes": 2**29,
        "torch_dtypes": ["float32", "bfloat16"],
        "torch-float32_ms_median": 400.0, "torch-float32_ms_min": 380.0,
        "torch-bfloat16_ms_median": 250.0, "torch-bfloat16_ms_min": 240.0,
        "torch_mem_growth_bytes": 3 * 2**20,
    }  # fmt: skip
    head, _, line = step.fmt_rows([row], "train", peak=1e13).splitlines()

    def split(text: str) -> list[str]:
        return [cell.strip() for cell in text.strip().strip("|").split("|")]

    cells = dict(zip(split(head), split(line), strict=True))
    assert cells["clips/s"] == "20.00"  # batch / median step time
    assert cells["GFLOP/s"] == "5000"  # FLOPs / median time
    assert cells["MFU %"] == "50.0"  # FLOP/s / peak
    assert cells["XLA peak (temp) MiB"] == "1024 (512)"
    assert cells["PT float32 clips/s"] == "10.00"
    assert cells["JAX/PT float32 time"] == "0.50"
    assert cells["JAX/PT bfloat16 time"] == "0.80"
    assert cells["PT float32 mem+ MiB"] == "3"


def test_step_table_pairs_each_round_with_the_baseline():
    row = {
        "form": "TSM", "placement": "CinST", "dtype": "float32", "batch": 1, "mode": "train",
        "jax_ms_median": 110.0, "jax_ms_min": 105.0, "compile_s": 12.0, "flops": 1e12,
        "torch_dtypes": [], "baseline_ms_median": 100.0, "baseline_ms_min": 95.0,
        "jax_ms_all": [105.0, 110.0, 121.0, 110.0, 132.0],
        "baseline_ms_all": [100.0, 100.0, 110.0, 100.0, 110.0],
    }  # fmt: skip
    head, _, line = step.fmt_rows([row], "train", peak=1e13).splitlines()
    cells = dict(zip(head.strip("|").split("|"), line.strip("|").split("|"), strict=True))
    assert cells[" baseline ms median (min) "] == " 100 (95) "
    # Per round 1.05, 1.10, 1.10, 1.10, 1.20: the median and the 5-round interval [min, max].
    assert cells[" JAX over baseline, paired [90 % CI] "] == " +10.0 % [+5.0, +20.0] "


def test_baseline_models_are_another_checkouts_own_modules():
    baseline = common.baseline_models(str(BENCH.parent))
    assert baseline.__name__ == "aia_jax_baseline.models"
    from aia_jax.models import attention  # noqa: PLC0415

    # Its modules import each other, not this checkout's.
    assert baseline.attention.fused.__name__ == "aia_jax_baseline.models.fused"
    assert baseline.AttentionUnit is not attention.AttentionUnit
    assert sorted(baseline.PLACEMENTS) == sorted(attention.PLACEMENTS)


def test_flops_stage_sizes():
    assert flops.stage_sizes(224) == [56, 28, 14, 7]
    assert flops.stage_sizes(32) == [8, 4, 2, 1]


def test_unit_instruction_regex_with_and_without_percent():
    for line in (
        "  %fusion.3 = f32[1,8,56,56,64]{4,3,2,1,0} fusion(%p0), kind=kLoop",
        "  ROOT tuple.1 = (f32[2]{0}, f32[3]{0}) tuple(a, b)",
    ):
        assert unit._INSTRUCTION.match(line)


def test_gpu_session_calls_existing_flags():
    """Each `part` of bench/gpu_session.sh names a script and flags that script accepts."""
    text = (BENCH / "gpu_session.sh").read_text()
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(BENCH / "gpu_session.sh")], check=True)
    calls = re.findall(r"^part \w+ \d+ (bench/\w+\.py)((?:.*\\\n)*.*)$", text, re.M)
    modules = {"bench/step.py": step, "bench/overhead.py": overhead, "bench/unit.py": unit}
    assert {script for script, _ in calls} == set(modules)
    for script, rest in calls:
        out = io.StringIO()
        old = sys.argv
        sys.argv = [script, "--help"]
        try:
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
                modules[script].main()
        finally:
            sys.argv = old
        accepted = set(re.findall(r"--[\w-]+", out.getvalue()))
        for flag in re.findall(r"(?<!\S)--[\w-]+", rest):
            assert flag in accepted, f"{script} takes no {flag}"
        if script != "bench/unit.py":  # the script adds --json to these
            assert "--json" in accepted


@pytest.mark.parametrize(
    ("vendor", "family", "flags", "expected"),
    [
        ("GenuineIntel", "6", "fma avx2 avx512f", 64),
        ("AuthenticAMD", "25", "fma avx2 avx512f", 32),  # Zen 4: 256-bit FMA pipes
        ("AuthenticAMD", "26", "fma avx2 avx512f", 64),  # Zen 5
        ("AuthenticAMD", "25", "fma avx2", 32),
    ],
)
def test_cpu_peak_flop_per_cycle(monkeypatch, vendor, family, flags, expected):
    info = {"vendor_id": vendor, "cpu family": family, "flags": flags}
    monkeypatch.setattr(common, "_cpuinfo", lambda field: info.get(field, ""))
    assert common.cpu_flop_per_cycle()[0] == expected
