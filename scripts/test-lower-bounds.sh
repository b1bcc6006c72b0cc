#!/usr/bin/env bash
# The core's lower bounds, tested: a fresh venv with the oldest release series pyproject.toml
# admits for every core dependency (">=1.26" -> "==1.26.*", the newest patch of it), the package
# from this checkout, and the tests of the core (model, training, evaluation, data, readers).
# Tests that need an extra (encoders: MobileNetV2; workbench: the explorers) fail there by design.
#   bash scripts/test-lower-bounds.sh                 # Python 3.11 (python3.11 on PATH)
#   PYTHON=python3.12 bash scripts/test-lower-bounds.sh
# torch on another Python than 3.11 comes from PyPI here: a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.cache/lower-bounds-$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}
pins=$("$PYTHON" - <<'PY'
import re, tomllib
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name, low = re.match(r"([A-Za-z0-9_.-]+).*?>=([0-9.]+)", dep).groups()
    print(f"{name}=={low if low.count('.') >= 2 else low + '.*'}")
PY
)
echo "lower bounds: $(echo $pins)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet $pins "pytest>=8" "pyyaml>=6" "packaging>=23"
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE "^(torch|numpy|pandas|pyarrow|scipy|tqdm|pillow) "
OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=0 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD" \
  "$VENV/bin/python" -m pytest -p no:cacheprovider tests/test_model.py tests/test_train.py tests/test_evaluate.py \
  tests/test_metrics.py tests/test_splits.py tests/test_split_lazy.py tests/test_preprocess.py \
  tests/test_readers_recbole.py tests/test_readers_amazon.py tests/test_store.py tests/test_synthetic.py \
  tests/test_significance.py tests/test_kernels.py tests/test_sampled.py tests/test_released_behaviours.py \
  tests/test_prepare.py tests/test_runtime.py tests/test_faults.py "$@"
