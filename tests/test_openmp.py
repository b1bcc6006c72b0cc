"""The OpenMP spin count the workbench sets on import, and where it leaves the user's choice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hm4sr_core import openmp

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("env, want", [
    ({}, {"GOMP_SPINCOUNT": openmp.SPIN_COUNT}),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, {}),
    ({"GOMP_SPINCOUNT": "0"}, {}),
    ({"PATH": "/usr/bin"}, {"GOMP_SPINCOUNT": openmp.SPIN_COUNT}),
])
def test_defaults_add_a_spin_count_only_where_nothing_is_chosen(env, want):
    assert openmp.defaults(env) == want


def _child_environment(**set_vars):
    env = {k: v for k, v in os.environ.items() if k not in openmp.VARIABLES}
    env.update(set_vars, PYTHONPATH=str(ROOT))
    code = ("import os, hm4sr_core, torch; from hm4sr_core.train import environment; "
            "e = environment(); print(os.environ.get('GOMP_SPINCOUNT'), e['GOMP_SPINCOUNT'], e['OMP_WAIT_POLICY'])")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=True).stdout.split()


def test_importing_the_package_sets_the_spin_count_and_records_it():
    """Set before torch loads libgomp (which reads it once), recorded with every result."""
    assert _child_environment() == [openmp.SPIN_COUNT, openmp.SPIN_COUNT, "None"]


def test_a_wait_policy_of_the_users_is_kept():
    assert _child_environment(OMP_WAIT_POLICY="PASSIVE") == ["None", "None", "PASSIVE"]

