"""Benchmarks, each a program run as ``python -m benchmarks.NAME``.

Every one of them runs with the workbench's process settings (hm4sr_core.runtime), applied
here, once, before any benchmark imports torch. ``HM4SR_BENCH_OPENMP=untouched`` leaves the
OpenMP variables as the environment has them (benchmarks/omp_wait.py times libgomp's own
default that way)."""

import os as _os

from hm4sr_core import runtime as _runtime

_runtime.configure_process(openmp=_os.environ.get("HM4SR_BENCH_OPENMP") != "untouched")
