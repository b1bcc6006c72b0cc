#!/usr/bin/env bash
# One short session on a GPU machine (the device tool), everything in one call:
#   1. the CUDA tests (tests/test_cuda.py: training, bf16 autocast, GPU checkpoint re-scored on CPU);
#   2. NVIDIA MPS started when its control program is there (workers share the card far
#      better under it: README, "On a GPU");
#   3. the ml-100k results table (hm4sr table, 27 runs, --jobs workers sharing the GPU);
#   4. with FIDELITY=1, beside it: the `reference` configuration in prefix mode for two
#      epochs, seeds 2025-2027, with the dataset's 19 genre columns and padded to the
#      released code's 192 (category_columns): seed noise of the first epochs, and whether
#      the padding explains the released code's faster first epoch (README: it does not).
# Results (no checkpoints) are packed into $OUT (or runs/cuda-session) as .tgz files.
# Needs data/processed/ml-100k (hm4sr prepare ml-100k here; carry it to the GPU machine).
# Usage: OUT=/some/dir LIMIT=570 JOBS=9 [FIDELITY=1] bash benchmarks/cuda_session.sh
set -u
OUT=${OUT:-runs/cuda-session}
LIMIT=${LIMIT:-570}     # seconds the whole script may take (the device tool allows 600 a command)
JOBS=${JOBS:-9}
FIDELITY=${FIDELITY:-0}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"
start=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import sys, torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "CUDA tests failed: stopping before the table"; exit 1; }
echo "tests done after $(( $(date +%s) - start )) s"
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d; then
  echo "MPS daemon started"
else
  echo "no MPS: workers share the GPU by time slicing (slower)"
fi

BUDGET=$(( LIMIT - ($(date +%s) - start) - 30 ))  # steps 3-4; 30 s kept for packing the results
echo "table budget ${BUDGET} s"
timeout "$BUDGET" $PY -m hm4sr_core.cli table --data ml-100k --out runs/ml100k-table --jobs "$JOBS" \
    --set device=cuda --quiet > "$OUT/table.log" 2>&1 &
fidelity() {  # $1 = category columns (0 = the dataset's 19)
  for seed in 2025 2026 2027; do
    $PY -m hm4sr_core.cli train --data ml-100k --model reference --mode prefix --epochs 2 --seed "$seed" \
      --set bucket_by_length=false --set device=cuda --set category_columns="$1" \
      --out "runs/fidelity-gpu/columns-$1/seed-$seed" --quiet || echo "FAILED columns $1 seed $seed"
  done
}
if [ "$FIDELITY" = 1 ]; then
  ( timeout "$BUDGET" bash -c "$(declare -f fidelity); PY=$PY fidelity 0" > "$OUT/fidelity0.log" 2>&1 ) &
  ( timeout "$BUDGET" bash -c "$(declare -f fidelity); PY=$PY fidelity 192" > "$OUT/fidelity192.log" 2>&1 ) &
fi
wait
echo "table + fidelity done after $(( $(date +%s) - start )) s"
tail -5 "$OUT/table.log"
tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude='steps.csv' runs/ml100k-table runs/fidelity-gpu 2>/dev/null
tar czf "$OUT/steps.tgz" $(find runs/ml100k-table runs/fidelity-gpu -name steps.csv 2>/dev/null) 2>/dev/null
ls -la "$OUT"
