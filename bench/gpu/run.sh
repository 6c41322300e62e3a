#!/usr/bin/env bash
# The GPU rows of the speed bench (issue 17): DiT-XL/2 at 256 tokens and the FLUX bench width at 1024 tokens, in
# bfloat16, eager and compiled; every cached row is timed against dense in the same process, alternated. Run from
# the repository root on a machine with a CUDA device:
#
#   OUT=/tmp/gpu bash bench/gpu/run.sh        # one JSON file per run and log.txt in $OUT
#
# First bench/gpu/exact.py checks exactness there, bench/gpu/device_time.py splits device busy time from wall
# time, and bench/gpu/graphs.py replays whole trajectories captured in CUDA graphs (no launch cost, dense or cached). DEVICE=cpu DTYPE=float32 QUICK=1 runs the same commands, tiny, on a CPU (a check of the script itself).
set -u
OUT=${OUT:?set OUT to the folder for the results}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
quick=()
[ -n "${QUICK:-}" ] && quick=(--size tiny --steps 3 --rounds 1)
fluxtokens=1024
[ -n "${QUICK:-}" ] && fluxtokens=16

bench() {  # bench NAME SECONDS ARGS...: one bench run, its table on stdout, its rows in $OUT/NAME.json
  local name=$1 limit=$2
  shift 2
  echo "== $name: python -m diffsparse.bench --device $DEVICE --dtype $DTYPE $*"
  timeout "$limit" python3 -m diffsparse.bench --device "$DEVICE" --dtype "$DTYPE" "$@" --json "$OUT/$name.json"
  echo "== $name: exit status $?"
}

{
  date -u
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
  timeout 90 python3 bench/gpu/exact.py --device "$DEVICE" --dtype "$DTYPE" ${QUICK:+--quick}
  echo "== exact.py: exit status $?"
  timeout 120 python3 bench/gpu/device_time.py --device "$DEVICE" --dtype "$DTYPE" ${QUICK:+--quick}
  echo "== device_time.py: exit status $?"
  timeout 240 python3 bench/gpu/graphs.py --device "$DEVICE" --dtype "$DTYPE" ${QUICK:+--quick}
  echo "== graphs.py: exit status $?"
  bench dit-xl2-eager 90 --rounds 5 --reuse-kv "${quick[@]}"
  bench flux-1024-eager 90 --model flux --tokens $fluxtokens --rounds 5 --reuse-kv "${quick[@]}"
  bench dit-xl2-compiled 150 --rounds 3 --compile --schedules uniform-0.5,uniform-0.75 "${quick[@]}"
  bench flux-1024-compiled 150 --model flux --tokens $fluxtokens --rounds 3 --compile \
    --schedules uniform-0.5,uniform-0.75 "${quick[@]}"
  bench dit-xl2-batch16-eager 45 --rounds 5 --batch 16 "${quick[@]}"
} 2>&1 | tee "$OUT/log.txt"
