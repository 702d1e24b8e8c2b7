#!/usr/bin/env bash
# ckptd's GPU checks, in one go on a CUDA machine (about 5-10 minutes on one GPU):
#   1. pytest -m gpu                 the GPU tests of the suite
#   2. python -m bench.gpu_checks    pinned registration, D2H bandwidth, overlap with compute
#   3. bench.run --device cuda --quick      every system on tiny GPU workloads
#   4. bench.run --device cuda (reduced)    ckptd vs async_save vs torch.save on the 1 GB model
# Usage: bash bench/gpu.sh [OUT_DIR]        (default bench/results/gpu; PY=... to pick a python)
# Needs a CUDA build of torch in the venv: make setup TORCH=torch
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-bench/results/gpu}
mkdir -p "$OUT"
declare -a SUMMARY=()
FAILED=0

run_step() {  # run_step NAME TIMEOUT_S CMD...
    local name=$1 limit=$2
    shift 2
    printf '\n==================== %s\n$ %s\n' "$name" "$*"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$(echo "$name" | tr -c 'a-zA-Z0-9\n' '_').log"
    local rc=${PIPESTATUS[0]}
    local verdict=PASS
    if [ "$rc" -ne 0 ]; then verdict="FAIL (exit $rc)"; FAILED=1; fi
    SUMMARY+=("$(printf '%-40s %-16s %4ss' "$name" "$verdict" $((SECONDS - started)))")
}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: torch in $PY sees no CUDA device; on a GPU machine run: make setup TORCH=torch" >&2
    exit 2
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name())'

run_step "1 pytest -m gpu" 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider
run_step "2 gpu checks" 150 "$PY" -m bench.gpu_checks --out "$OUT"
run_step "3 bench --device cuda --quick" 240 "$PY" -m bench.run --device cuda --quick --out "$OUT/quick"
run_step "4 bench --device cuda (qwen, 3 systems)" 300 "$PY" -m bench.run --device cuda \
    --workloads qwen --systems ckptd,dcp_async,torch_save --reps 3 --no-train --out "$OUT/qwen"

printf '\n==================== summary (outputs in %s)\n' "$OUT"
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED
