#!/usr/bin/env bash
# The GPU benchmark (`make bench-gpu`): five bench.py steps on one CUDA GPU, each under its own time limit so that a slow
# step cannot hold up the rest (490 s of limits in all, about 8 minutes; 120 s a step in the dry run). Each step writes
# <date>-cuda-<step>.json and .md, and <step>.log, to $OUT; `python bench/report.py $OUT/<date>-cuda-*.json` joins the
# steps into one table.
#
#   bash bench/gpu.sh              # on a CUDA GPU, results in bench/results/
#   DRY_RUN=1 bash bench/gpu.sh    # the same steps on the CPU: tiny sizes, fp32, no compile, 1-2 minutes, results in
#                                  # runs/bench-gpu-dry/; checks the script, its numbers mean nothing
#
# Variables: OUT (results folder), PY (the Python to run, default python3), DRY_RUN (1 for the CPU dry run),
# STEP_LIMIT (seconds: one time limit for every step instead of the ones below, e.g. 600 on a slower GPU).
# Exit status: 0 when every step finished, 1 when one failed or ran out of time (the others still run), 2 on bad input.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
die() { echo "bench/gpu.sh: $*" >&2; exit 2; }
case "${DRY_RUN:-}" in
  ''|0) DRY='' ;;
  1) DRY=1 ;;
  *) die "DRY_RUN must be 1 (the CPU dry run) or empty or 0 (the GPU benchmark), got '$DRY_RUN'" ;;
esac
STEP_LIMIT=${STEP_LIMIT:-}
[[ -z "$STEP_LIMIT" || "$STEP_LIMIT" =~ ^[1-9][0-9]*$ ]] \
  || die "STEP_LIMIT must be a whole number of seconds >= 1 (every step's time limit), got '$STEP_LIMIT'"

if [ -n "$DRY" ]; then
  OUT=${OUT:-runs/bench-gpu-dry}
  DEV=cpu; BIG=small; MNV2=small; COMPILE=''
  # fp32 and a small peak product: on a CPU without bf16 instructions bf16 is emulated and takes minutes
  COMMON="--no-amp --peak-n 256"; SZ="--batch-size 4 --iters 1 --warmup 0 --train-n 40"; EV="--eval-n 16 --aa reduced"
  STEP_LIMIT=${STEP_LIMIT:-120}
else
  OUT=${OUT:-bench/results}
  "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
    || die "torch sees no CUDA GPU (PY=$PY); 'make bench-gpu DRY_RUN=1' runs the same steps on the CPU"
  DEV=cuda; BIG=r18-wrn34-20; MNV2=mnv2-wrn34-10; COMPILE='--compile'
  COMMON=''; SZ="--batch-size 128"; EV="--eval-n 1000"
fi
mkdir -p "$OUT" || die "OUT: cannot create the folder '$OUT'"

FAILED=()
step() {  # step SECONDS TAG ARGS...: one bench.py call under its time limit, its log next to its result
  local secs=${STEP_LIMIT:-$1} tag=$2 rc; shift 2
  echo "== $tag (limit ${secs}s)"
  # shellcheck disable=SC2086
  timeout "$secs" "$PY" bench/bench.py --device $DEV --out "$OUT" --tag "$tag" $COMMON "$@" > "$OUT/$tag.log" 2>&1
  rc=$?
  tail -25 "$OUT/$tag.log"
  case $rc in
    0) echo "== $tag: done" ;;
    124) echo "== $tag: stopped at its time limit of ${secs}s (log: $OUT/$tag.log)"; FAILED+=("$tag (time limit)") ;;
    *) echo "== $tag: failed with exit status $rc (log: $OUT/$tag.log)"; FAILED+=("$tag (exit $rc)") ;;
  esac
}
# shellcheck disable=SC2086
{
# 1. AdaAD, ResNet-18 <- WRN-34-20, batch 128: naive, ours and fast (bf16 + channels_last); then fast compiled
step 150 adaad         --pairs $BIG --methods adaad $SZ
step 120 adaad-compile --pairs $BIG --methods adaad --variants fast $COMPILE $SZ
# 2. the other methods at that pair (ours and fast), and MobileNetV2 <- WRN-34-10 (fast)
step 100 others        --pairs $BIG --methods adaiad rslad ard pgd-at --variants ours fast $SZ
step 60  mnv2          --pairs $MNV2 --methods adaad pgd-at --variants fast $SZ
# 3. evaluation throughput on the ResNet-18 student (untrained): PGD-10 and standard AutoAttack on 1,000 test images
step 60  eval          --pairs --eval --eval-pair $BIG --eval-attacks pgd10 aa $EV
}
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "bench/gpu.sh: ${#FAILED[@]} of 5 steps did not finish: ${FAILED[*]}; the others' results are in $OUT" >&2
  exit 1
fi
echo "bench/gpu.sh: every step finished; results in $OUT (one table: python bench/report.py $OUT/<date>-$DEV-*.json)"
