"""hm4sr_core.allocator: glibc keeps freed memory for reuse unless the user opts out."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CODE = "import hm4sr_core, hm4sr_core.allocator as a; print(a.keep_freed_memory())"


def _applied(env: dict) -> str:
    proc = subprocess.run([sys.executable, "-c", CODE], env={**os.environ, **env}, capture_output=True,
                          text=True, check=True)
    return proc.stdout.strip()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_thresholds_are_raised_on_import_and_the_opt_out_is_honoured():
    assert _applied({"HM4SR_SYSTEM_MALLOC": ""}) == "True"
    assert _applied({"HM4SR_SYSTEM_MALLOC": "1"}) == "False"


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("value", ["lots", "4096", "0"])
def test_a_bad_threshold_warns_and_falls_back_to_the_default(value):
    proc = subprocess.run([sys.executable, "-W", "always", "-c", CODE],
                          env={**os.environ, "HM4SR_SYSTEM_MALLOC": "", "HM4SR_MMAP_THRESHOLD_MB": value},
                          capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "True"
    assert "HM4SR_MMAP_THRESHOLD_MB" in proc.stderr and "(0, 2048)" in proc.stderr
