"""Provenance (hm4sr_core.provenance): every result says which code, libraries and CPU made it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from hm4sr_core import provenance

# Excerpts of real /proc/cpuinfo texts (two logical CPUs each; flags cut down).
AMD = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9B14
stepping\t: 1
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9B14
stepping\t: 1
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16
"""
INTEL_HYPERTHREADS = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
physical id\t: 0
core id\t\t: 0
flags\t\t: avx2 avx512f amx_bf16 amx_tile

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
physical id\t: 0
core id\t\t: 0
flags\t\t: avx2 avx512f amx_bf16 amx_tile
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""


def test_cpuinfo_names_the_model_vendor_family_and_physical_cores():
    amd = provenance.parse_cpuinfo(AMD)
    assert amd["cpu_model"] == "AMD EPYC 9B14" and amd["cpu_vendor"] == "AuthenticAMD"
    assert (amd["cpu_family"], amd["cpu_model_number"], amd["cpu_stepping"]) == ("25", "17", "1")
    assert amd["physical_cores"] == 2 and amd["cpu_flags"] == ["avx2", "avx512f", "avx512_bf16"]
    intel = provenance.parse_cpuinfo(INTEL_HYPERTHREADS)
    assert intel["cpu_model"].startswith("Intel(R) Xeon(R) Platinum 8481C")
    assert intel["physical_cores"] == 1  # two hyperthreads of one core
    assert intel["cpu_flags"] == ["avx2", "avx512f", "amx_bf16", "amx_tile"]
    arm = provenance.parse_cpuinfo(ARM)
    assert arm["cpu_model"] is None and arm["physical_cores"] is None and arm["cpu_flags"] == []


def test_this_machine_is_named_by_its_cpu_model_not_its_architecture():
    here = provenance.machine()
    assert here["cpu_count"] >= 1 and 1 <= here["cpus_usable"] <= here["cpu_count"]
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or "model name" not in cpuinfo.read_text():
        pytest.skip("no /proc/cpuinfo model name here")
    line = next(x for x in cpuinfo.read_text().splitlines() if x.startswith("model name"))
    assert here["cpu_model"] == line.partition(":")[2].strip()
    assert here["cpu_model"] != here["machine"]


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def test_git_state_is_the_commit_and_whether_tracked_files_changed(tmp_path):
    assert provenance.git_state(tmp_path) == {"commit": None, "dirty": None}  # not a checkout
    _git(tmp_path, "init", "-q")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.py").write_text("1\n")
    (tmp_path / "b.txt").write_text("1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert provenance.git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "untracked.txt").write_text("new\n")  # untracked files do not count
    assert provenance.git_state(tmp_path)["dirty"] is False
    (tmp_path / "b.txt").write_text("2\n")
    assert provenance.git_state(tmp_path) == {"commit": head, "dirty": True}
    assert provenance.git_state(tmp_path, ("a",))["dirty"] is False  # only the paths asked about
    assert provenance.git_state(tmp_path, ("b.txt",))["dirty"] is True


def test_versions_come_from_installed_metadata():
    got = provenance.versions(("numpy", "no-such-distribution-hm4sr"))
    import numpy
    assert got["numpy"] == numpy.__version__ and got["no-such-distribution-hm4sr"] is None
    assert got["python"].count(".") == 2 and got["hm4sr_core"]


def test_a_training_result_records_the_provenance_of_its_run(tiny_run):
    _, out = tiny_run
    env = json.loads((out / "results.json").read_text())["environment"]
    expected = provenance.environment()
    for key in ("cpu_model", "cpu_vendor", "cpu_count", "cpus_usable", "physical_cores", "platform", "torch",
                "numpy", "hm4sr_core", "python"):
        assert env[key] == expected[key], key
    assert set(env["git"]) == {"commit", "dirty"}
    assert env["git"]["commit"] == expected["git"]["commit"]
