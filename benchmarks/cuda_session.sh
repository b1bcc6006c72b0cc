#!/usr/bin/env bash
# One short session on a GPU machine (the device tool), everything in one call:
#   1. the CUDA tests (tests/test_cuda.py: training, bf16 autocast, GPU checkpoint re-scored on CPU);
#   2. NVIDIA MPS started when its control program is there (workers share the card far
#      better under it: docs/guide.md, "On a GPU");
#   3. with TABLE=1 (default): the ml-100k results table (hm4sr table, 27 runs, --jobs workers
#      sharing the GPU);
#   4. with SCREEN=1: the fidelity screen (python -m benchmarks.fidelity: the `reference`
#      configuration in prefix mode, one change at a time, seeds 2025-2027, 2 epochs), with
#      --jobs workers of its own.
# Results (no checkpoints) are packed into $OUT (or runs/cuda-session) as .tgz files.
# Needs data/processed/ml-100k (hm4sr prepare ml-100k here; carry it to the GPU machine).
# Usage: OUT=/some/dir LIMIT=570 JOBS=9 [TABLE=0] [SCREEN=1 SCREEN_JOBS=13] bash benchmarks/cuda_session.sh
set -u
OUT=${OUT:-runs/cuda-session}
LIMIT=${LIMIT:-570}     # seconds the whole script may take (the device tool allows 600 a command)
JOBS=${JOBS:-9}
TABLE=${TABLE:-1}
SCREEN=${SCREEN:-0}
SCREEN_JOBS=${SCREEN_JOBS:-13}
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
echo "table/screen budget ${BUDGET} s"
if [ "$TABLE" = 1 ]; then
  timeout "$BUDGET" $PY -m hm4sr_core.cli table --data ml-100k --out runs/ml100k-table --jobs "$JOBS" \
      --set device=cuda --quiet > "$OUT/table.log" 2>&1 &
fi
if [ "$SCREEN" = 1 ]; then
  timeout "$BUDGET" $PY -m benchmarks.fidelity --device cuda --jobs "$SCREEN_JOBS" --threads 1 \
      --out runs/fidelity-screen > "$OUT/screen.log" 2>&1 &
fi
wait
echo "table/screen done after $(( $(date +%s) - start )) s"
tail -5 "$OUT"/*.log
tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude='steps.csv' runs/ml100k-table runs/fidelity-screen 2>/dev/null
tar czf "$OUT/steps.tgz" $(find runs/ml100k-table runs/fidelity-screen -name steps.csv 2>/dev/null) 2>/dev/null
ls -la "$OUT"
