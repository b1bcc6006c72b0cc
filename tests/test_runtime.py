"""hm4sr_core.runtime: importing the package changes nothing process-wide; one explicit call
(made by the ``hm4sr`` command, the notebook runner and kernels, ``make lab``, the benchmarks)
applies the OpenMP spin count and the glibc allocator thresholds, and leaves a user's choice."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from hm4sr_core import runtime

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize("env, want", [
    ({}, {"GOMP_SPINCOUNT": runtime.SPIN_COUNT}),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, {}),
    ({"GOMP_SPINCOUNT": "0"}, {}),
    ({"PATH": "/usr/bin"}, {"GOMP_SPINCOUNT": runtime.SPIN_COUNT}),
])
def test_openmp_defaults_add_a_spin_count_only_where_nothing_is_chosen(env, want):
    assert runtime.openmp_defaults(env) == want


def _child(code: str, **set_vars) -> list[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (*runtime.OPENMP_VARIABLES, "HM4SR_SYSTEM_MALLOC", "HM4SR_MMAP_THRESHOLD_MB")}
    env.update(set_vars, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split() + ([done.stderr] if "HM4SR_MMAP_THRESHOLD_MB" in done.stderr else [])


REPORT = ("from hm4sr_core.provenance import environment; e = environment(); "
          "print(os.environ.get('GOMP_SPINCOUNT'), e['GOMP_SPINCOUNT'], e['OMP_WAIT_POLICY'], e['allocator_kept'])")


def _needs_every_extra():
    """The import checks walk every module, the optional ones too: they need all extras."""
    for module in ("plotly", "ipywidgets", "optuna", "onnxruntime", "nbformat"):
        pytest.importorskip(module, reason=f"{module} (an extra) is not installed: module import checks skipped")


def test_importing_the_package_and_its_modules_changes_nothing():
    _needs_every_extra()
    code = "import os, hm4sr_core, hm4sr_core.cli, hm4sr_core.notebooks, widgets.explorers, torch; " + REPORT
    assert _child(code) == ["None", "None", "None", "False"]


def test_importing_every_module_leaves_the_environment_as_it_was():
    _needs_every_extra()
    code = ("import os, pkgutil, importlib, json; before = dict(os.environ); import hm4sr_core, widgets\n"
            "for pkg in (hm4sr_core, widgets):\n"
            "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
            "        if not m.name.endswith('__main__'):\n"
            "            importlib.import_module(m.name)\n"
            "after = dict(os.environ)\n"
            "print(json.dumps(sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))))")
    assert _child(code) == ["[]"]


def test_every_notebook_applies_the_settings_in_its_first_code_cell_before_torch():
    nbformat = pytest.importorskip("nbformat", reason="nbformat (workbench extra) is not installed")
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        first = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code").source
        assert "runtime.configure_process()" in first, f"{path.name}: first code cell lacks runtime.configure_process()"
        assert "import torch" not in first.split("runtime.configure_process()")[0], path.name


def test_configure_process_sets_the_spin_count_before_torch_and_records_it():
    code = ("import os; from hm4sr_core import runtime; r = runtime.configure_process(); "
            "assert r['openmp_in_effect'], r; import torch; " + REPORT)
    assert _child(code) == [runtime.SPIN_COUNT, runtime.SPIN_COUNT, "None", str(GLIBC)]


def test_the_command_line_applies_the_settings_and_keeps_a_users_wait_policy():
    code = ("import os; from hm4sr_core.__main__ import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" + REPORT.replace("; ", "\n"))
    out = _child(code)
    assert out[-4:] == [runtime.SPIN_COUNT, runtime.SPIN_COUNT, "None", str(GLIBC)]
    out = _child(code, OMP_WAIT_POLICY="PASSIVE")
    assert out[-4:] == ["None", "None", "PASSIVE", str(GLIBC)]


def test_a_late_call_says_the_openmp_part_reaches_children_only():
    code = ("import os, torch; from hm4sr_core import runtime; r = runtime.configure_process(); "
            "print(r['openmp_in_effect'], os.environ.get('GOMP_SPINCOUNT'))")
    assert _child(code) == ["False", runtime.SPIN_COUNT]


def test_the_runtime_launcher_runs_a_command_with_the_setting():
    env = {k: v for k, v in os.environ.items() if k not in runtime.OPENMP_VARIABLES}
    done = subprocess.run([sys.executable, "-m", "hm4sr_core.runtime", sys.executable, "-c",
                           "import os; print(os.environ.get('GOMP_SPINCOUNT'))"], env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == runtime.SPIN_COUNT
    missing = subprocess.run([sys.executable, "-m", "hm4sr_core.runtime", "no-such-command-hm4sr"],
                             env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no-such-command-hm4sr" in missing.stderr


ALLOCATOR = "from hm4sr_core import runtime; print(runtime.configure_process(openmp=False)['allocator_kept'])"


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_allocator_thresholds_are_raised_and_the_opt_out_is_honoured():
    assert _child(ALLOCATOR) == ["True"]
    assert _child(ALLOCATOR, HM4SR_SYSTEM_MALLOC="1") == ["False"]


@pytest.mark.skipif(not GLIBC, reason="glibc only")
@pytest.mark.parametrize("value", ["lots", "4096", "0"])
def test_a_bad_threshold_warns_and_falls_back_to_the_default(value):
    out = _child(ALLOCATOR, HM4SR_MMAP_THRESHOLD_MB=value)
    assert out[0] == "True" and "(0, 2048)" in out[-1]


def test_the_notebook_runner_leaves_the_callers_environment_as_it_was(tmp_path, monkeypatch):
    """The runner hands its kernels the data and runs roots and the OpenMP setting through the
    environment; a researcher calling it from their own Python keeps theirs afterwards."""
    pytest.importorskip("papermill", reason="papermill (workbench extra) is not installed")
    from hm4sr_core import paths
    from hm4sr_core.notebooks import NotebookError, run_notebooks
    for key in (paths.DATA_ENV, paths.RUNS_ENV, "GOMP_SPINCOUNT", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(key, raising=False)
    before = dict(os.environ)
    with pytest.raises(NotebookError, match="01_prepare_data"):
        run_notebooks(data="no-such-dataset", notebooks=("01_prepare_data",), out=tmp_path / "run", progress=False,
                      cell_timeout=120)
    assert dict(os.environ) == before
    kernel_log = (tmp_path / "run" / "manifest.json").read_text()
    assert "no-such-dataset" in kernel_log
