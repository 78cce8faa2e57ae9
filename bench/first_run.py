"""The first run of `train.py` with an empty compilation cache: restarted after compiling or not.

    python bench/first_run.py                                   # the README quick start, 2 rounds
    python bench/first_run.py --rounds 3 --warm -- --config.num_epochs=1

On XLA:CPU `train.py` compiles its programs before the first batch and, when it wrote them to
the persistent compilation cache, restarts itself to read them back with a clean heap
(`aia_jax.compilation_cache.restart_pays`; README, "What makes this fast on XLA:CPU"). This
times the command as a user runs it, in a subprocess with an empty cache (its own
`XDG_CACHE_HOME`) and a new workdir per run, both ways in each round: as it is ("restarted")
and with `AIA_JAX_RESTART_AFTER_COMPILE=0` ("compiled in the process"), alternating so that the
host's load falls on both. `--warm` runs each once more with the cache it filled. Printed per
run: wall time (the install and the dataset's generation left out: the dataset is generated
before the first timed run), the median of the logged clips/s, what the trainer printed about
each program ("c" compiled, "r" read from the cache, seconds), the final val top-1; then the
paired ratio of the wall times per round. Arguments after `--` go to `train.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
VARIANTS = (("compiled in the process", {"AIA_JAX_RESTART_AFTER_COMPILE": "0"}), ("restarted", {}))
_PROGRAM = re.compile(r"^(.+?) (compiled|read from the cache) in (\d+\.\d) s\.$", re.M)


def programs_of(stdout: str) -> str:
    """ "training c 18.7, evaluation c 4.4, …" from the trainer's "… compiled in 18.7 s." lines."""
    found = _PROGRAM.findall(stdout)
    return ", ".join(f"{name.split()[0].lower()} {how[0]} {secs}" for name, how, secs in found)


def run_train(config: str, extra: list[str], env: dict[str, str], tmp: str) -> dict:
    """One `train.py` run in a new workdir under `tmp`; wall time and what it printed."""
    workdir = tempfile.mkdtemp(dir=tmp, prefix="w")
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", config, "--workdir", workdir, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    rates = [r["clips_per_sec"] for r in records if "clips_per_sec" in r]
    top1 = [r["val/top1"] for r in records if "val/top1" in r]
    return {
        "wall": wall,
        "clips": statistics.median(rates) if rates else float("nan"),
        "programs": programs_of(proc.stdout),
        "restarted": "Restarting to run them from the cache" in proc.stdout,
        "top1": top1[-1] if top1 else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warm", action="store_true", help="each run again with its filled cache")
    parser.add_argument("extra", nargs="*", help="after --: overrides for train.py")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds: expected at least 1")

    base = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    for key in ("AIA_JAX_RESTARTED", "AIA_JAX_RESTART_AFTER_COMPILE"):
        base.pop(key, None)
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        # The dataset's generation (the quick start's first run) is not what is timed.
        warmup_env = {**base, "XDG_CACHE_HOME": tempfile.mkdtemp(dir=tmp)}
        run_train(args.config, [*args.extra, "--config.num_epochs=0.01"], warmup_env, tmp)
        for round_ in range(1, args.rounds + 1):
            walls = {}
            for name, switch in VARIANTS:
                env = {**base, **switch, "XDG_CACHE_HOME": tempfile.mkdtemp(dir=tmp)}
                cold = run_train(args.config, args.extra, env, tmp)
                walls[name] = cold["wall"]
                rows.append((round_, name, "empty", cold))
                if args.warm:
                    warm = run_train(args.config, args.extra, env, tmp)
                    rows.append((round_, name, "filled", warm))
            ratios.append(walls["restarted"] / walls["compiled in the process"])

    print("`" + " ".join(["python3 train.py --config", args.config, *args.extra]) + "`")
    print()
    columns = ("round", "variant", "cache", "wall s", "clips/s (median)", "programs (s)",
               "restarted", "val top-1")  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for round_, name, cache, r in rows:
        print(
            f"| {round_} | {name} | {cache} | {r['wall']:.1f} | {r['clips']:.0f} | "
            f"{r['programs']} | {'yes' if r['restarted'] else 'no'} | {r['top1']:.4f} |"
        )
    print()
    print(
        "wall time, restarted / compiled in the process, per round: "
        + ", ".join(f"{x:.3f}" for x in ratios)
        + f" (median {statistics.median(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
