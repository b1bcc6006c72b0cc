"""The package as a researcher installs it: a wheel built from this repository, installed (not
editable) into a fresh virtual environment that already holds the locked packages, used from
a folder outside the clone. Data land in that folder's data/ (or $HM4SR_DATA), never in
site-packages; the notebooks travel inside the wheel and run headlessly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "hidden_size=16", "--set", "num_layers=1", "--set", "inner_size=32", "--set", "max_length=20"]


def _run(cmd: list, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, hm4sr script, environment): the wheel installed into a fresh venv whose
    only other packages are this environment's locked ones (a .pth line: nothing copied)."""
    tmp = tmp_path_factory.mktemp("install")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HM4SR_DATA", "HM4SR_RUNS")}
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", tmp / "dist",
          ROOT], cwd=tmp, env=env)
    wheel = next((tmp / "dist").glob("hm4sr_workbench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "hm4sr_core/bundled_notebooks/00_expert_routing_tour.ipynb" in names
    assert not any(n.startswith(("tests/", "data/", "notebooks/", "benchmarks/")) for n in names)
    target = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp,
                     env=env).stdout.strip())
    (site / "locked-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", wheel], cwd=tmp, env=env)
    return python, target / "bin" / "hm4sr", env


def test_the_installed_package_is_the_wheel_not_the_clone(installed, tmp_path):
    python, _, env = installed
    out = _run([python, "-c", "import hm4sr_core, hm4sr_core.notebooks as n; print(hm4sr_core.__file__); "
                "print(n.NOTEBOOK_DIR)"], cwd=tmp_path, env=env).stdout.split()
    site = str(python.parent.parent)
    assert out[0].startswith(site) and out[1].startswith(site) and out[1].endswith("bundled_notebooks")


def test_prepare_train_and_a_notebook_run_from_a_folder_outside_the_clone(installed, tmp_path):
    python, hm4sr, env = installed
    work = tmp_path / "my-project"
    work.mkdir()
    _run([hm4sr, "prepare", "synthetic", "--users", "60", "--items", "40"], cwd=work, env=env)
    assert (work / "data" / "processed" / "synthetic" / "manifest.json").is_file()
    assert not list(python.parent.parent.rglob("manifest.json"))  # nothing written into the venv
    _run([hm4sr, "train", "--data", "synthetic", "--out", "runs/first", "--set", "epochs=1", *TINY], cwd=work,
         env=env)
    record = json.loads((work / "runs" / "first" / "results.json").read_text())
    assert record["test"]["ndcg@20"] >= 0.0 and (work / "runs" / "first" / "best.pt").is_file()

    elsewhere = tmp_path / "shared-data"  # --data-root and $HM4SR_DATA put the data elsewhere
    _run([hm4sr, "--data-root", elsewhere, "prepare", "synthetic", "--users", "60", "--items", "40", "--name", "w2"],
         cwd=work, env=env)
    assert (elsewhere / "processed" / "w2" / "manifest.json").is_file()
    _run([hm4sr, "train", "--data", "w2", "--out", "runs/second", "--set", "epochs=1", *TINY], cwd=work,
         env={**env, "HM4SR_DATA": str(elsewhere)})

    _run([hm4sr, "run-notebooks", "--smoke", "--notebooks", "00_expert_routing_tour", "--out", "runs/nb"], cwd=work,
         env=env, timeout=900)
    manifest = json.loads((work / "runs" / "nb" / "manifest.json").read_text())
    assert manifest["status"] == "ok", manifest["status"]
    assert manifest["git"]["commit"] is None  # an installed wheel is no git checkout
    assert (work / "runs" / "nb" / "00_expert_routing_tour.ipynb").is_file()

    _run([hm4sr, "copy-notebooks", "notebooks"], cwd=work, env=env)
    assert (work / "notebooks" / "00_expert_routing_tour.ipynb").is_file()
    again = subprocess.run([hm4sr, "copy-notebooks", "notebooks"], cwd=work, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr
