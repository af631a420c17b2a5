#!/usr/bin/env bash
# One prepared command for a lent H200 (issue #14): a lease has 15 minutes of device time in all and one command may
# run 10, so everything goes into this single command of about 8 minutes, each step under its own time limit so that a
# slow step cannot eat the rest, and whatever finished comes back through $OUT.
#
#   here:        bash tools/gpu_carry.sh && git commit ...      (fills the git-ignored .gpu/ with data and provenance)
#   device tool: run(command="bash bench/gpu_lease.sh", carry=[".gpu"], timeout_s=560)
#   here again:  copy the files from files_at into bench/results/, then python bench/report.py bench/results/<date>-cuda-*.json
#
# Try it on the CPU first with tiny sizes: TINY=1 OUT=/tmp/lease bash bench/gpu_lease.sh
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .gpu/env.sh ] && source .gpu/env.sh
OUT=${OUT:-bench/results}; PY=${PY:-python3}
mkdir -p "$OUT"
if [ -n "${TINY:-}" ]; then   # the same steps on the CPU, minutes instead of hours: checks the script, not the speed
  DEV=cpu; BIG=small; MNV2=small; SZ="--batch-size 8 --iters 1 --warmup 1 --train-n 64"; EV="--eval-n 16 --cw-steps 5 --aa reduced"; T=300
  COMPILE=""                  # inductor compiles for minutes on a CPU; the compiled path was tried on the CPU in tests/test_fast.py
else
  DEV=cuda; BIG=r18-wrn34-20; MNV2=mnv2-wrn34-10; SZ="--batch-size 128"; EV="--eval-n 1000"; T=1; COMPILE="--compile"
fi
step() {  # step SECONDS TAG ARGS...: one bench.py call under a time limit (x T on the CPU), its log next to its result
  local secs=$1 tag=$2; shift 2
  echo "== $tag (limit ${secs}s)"
  timeout $((secs * T)) $PY bench/bench.py --device $DEV --out "$OUT" --tag "$tag" "$@" 2>&1 | tee "$OUT/$tag.log" | tail -25
  echo "== $tag: exit ${PIPESTATUS[0]}"
}
# 1. the headline: AdaAD ResNet-18 <- WRN-34-20, naive vs ours vs fast (bf16 + channels_last), then fast compiled
step 150 adaad         --pairs $BIG --methods adaad $SZ
step 120 adaad-compile --pairs $BIG --methods adaad --variants fast $COMPILE $SZ
# 2. the other methods at that pair, and MobileNetV2 <- WRN-34-10, fast only (naive is the slow part)
step 100 others        --pairs $BIG --methods adaiad rslad ard pgd-at --variants ours fast $SZ
step 60  mnv2          --pairs $MNV2 --methods adaad pgd-at --variants fast $SZ
# 3. evaluation throughput on 1,000 images of the ResNet-18 student: PGD-10 and standard AutoAttack
step 60  eval          --pairs --eval --eval-pair $BIG --eval-attacks pgd10 aa $EV
ls -la "$OUT"
