#!/usr/bin/env bash
# The GPU rows of bench/RESULTS.md in one command, sized for one lent GPU session.
#
#   OUT=/some/dir bash bench/gpu_session.sh     # one H100/H200: about 9 minutes
#   SIZE=32 BATCH=1 BUDGET_S=400 OUT=/tmp/g bash bench/gpu_session.sh   # plumbing check on CPU
#
# Runs the host's own jax/jaxlib (CUDA plugin) and torch and installs nothing. The parts run in
# the order of what the speed issue asks, each under its own time limit and all within
# BUDGET_S seconds; each writes its log (the printed tables) and its JSON lines to $OUT, so a
# part that is cut short loses only itself:
#   1. step:     TSM and TSM_CinST_BN training and inference, bf16, beside the PyTorch reference
#                in float32 (as the release trains) and autocast bf16 on the same GPU:
#                clips/s, MFU, compile time, memory, JAX/PT ratios.
#   2. overhead: none / CinST / STinC, training and inference, bf16, JAX and PyTorch: the
#                attention's cost with a paired 90 % interval.
#   3. unit:     one CinST / STinC unit per ResNet-50 stage, `fused` against `xla`: which
#                attention implementation the GPU should default to.
#   4. remat:    the TSM_CinST_BN bf16 training step with and without `remat=True`: time
#                ratio and peak memory (runs only if the parts above leave it the time).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# A relative OUT is relative to where the command was started, not to the repository.
OUT=${OUT:-$ROOT/runs/gpu_session}
mkdir -p "$OUT" || exit
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit
BUDGET_S=${BUDGET_S:-540}
SIZE=${SIZE:-224}
BATCH=${BATCH:-32}
export PYTHONUNBUFFERED=1
# JAX and PyTorch share the GPU in one process: JAX takes 45 % up front, not its default 75 %.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.45}
# Parts 1 and 2 compile some of the same programs: the second compile is a disk read.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/aia_jax_gpu_cache}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python3 -c 'import jax, jaxlib, flax, torch; print("jax", jax.__version__, "jaxlib",
    jaxlib.__version__, "flax", flax.__version__, "torch", torch.__version__,
    "devices", jax.devices(), "torch cuda", torch.cuda.is_available())' 2>&1
  nproc
} > "$OUT/env.txt"
cat "$OUT/env.txt"

part() {
  local name=$1 limit=$2 script=$3
  shift 3
  local left=$((BUDGET_S - SECONDS))
  if ((left < 45)); then
    echo "== $name: skipped, ${left} s of the budget left"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s, started at ${SECONDS} s): $script $*"
  local json=()
  [[ $script != bench/unit.py ]] && json=(--json "$OUT/$name.jsonl")
  timeout --signal=INT --kill-after=10 "$limit" python3 "$script" "$@" "${json[@]}" \
    >"$OUT/$name.log" 2>&1
  echo "   exit $? at ${SECONDS} s"
  grep -E '^(###|compiled|\| (net|placement|unit|TSM|none|CinST|STinC)[ _])' "$OUT/$name.log" | tail -n 30
}

part step 240 bench/step.py --forms TSM --placements none,CinST --dtype bfloat16 \
  --batch-sizes "$BATCH" --size "$SIZE" --modes train,infer --torch-dtypes float32,bfloat16 \
  --reps 10
part overhead 220 bench/overhead.py --forms TSM --placements none,CinST,STinC \
  --dtype bfloat16 --batch-sizes "$BATCH" --size "$SIZE" --modes train,infer --reps 15
part unit 150 bench/unit.py --units CinST,STinC --impls fused,xla --batch "$BATCH" \
  --dtype bfloat16 --reps 20
part remat 120 bench/step.py --forms TSM --placements CinST --dtype bfloat16 \
  --batch-sizes "$BATCH" --size "$SIZE" --modes train --remat --no-torch --reps 5 --warmup 2
echo "done in ${SECONDS} s; logs in $OUT"
