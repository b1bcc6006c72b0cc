"""hm4sr_core.runtime: importing the package changes nothing process-wide; one explicit call
(made by the ``hm4sr`` command, the notebook runner and kernels, ``make lab``, the benchmarks)
applies the OpenMP spin count and the glibc allocator thresholds, and leaves a user's choice."""

from __future__ import annotations

import os
import platform
import shutil
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


def test_the_runtime_launcher_runs_a_command_with_the_setting(tmp_path):
    env = {k: v for k, v in _mkl_env(tmp_path).items() if k not in runtime.OPENMP_VARIABLES}
    done = subprocess.run([sys.executable, "-m", "hm4sr_core.runtime", sys.executable, "-c",
                           "import os; print(os.environ.get('GOMP_SPINCOUNT'))"], env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == runtime.SPIN_COUNT
    preload = subprocess.run([sys.executable, "-m", "hm4sr_core.runtime", sys.executable, "-c", PLAIN_CODE_PATH],
                             env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert preload.returncode == 0, preload.stderr[-2000:]
    plain = subprocess.run([sys.executable, "-c", PLAIN_CODE_PATH], env={**env, "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True, timeout=120).stdout.strip()
    if AMD_WITH_MKL and HAS_CC and plain != "None":  # a kernel started under the launcher runs MKL's other path
        assert plain == "0" and preload.stdout.strip() not in ("0", "None"), (plain, preload.stdout)
    else:
        assert preload.stdout.strip() == plain
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


# ----------------------------------------------------------------------------- MKL's code paths on AMD CPUs

AMD_WITH_MKL = (runtime.mkl_shim_wanted(env={}) is None)  # an AMD x86-64 Linux CPU with AVX2 and FMA
HAS_CC = runtime.find_compiler() is not None
LINUX_X86 = platform.system() == "Linux" and platform.machine() == "x86_64"
CAN_LOAD = LINUX_X86 and HAS_CC  # HM4SR_MKL_INTEL_PATHS=1 loads it on any such machine
CPUINFO = "processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\nvendor_id\t: {vendor}\n"


@pytest.mark.parametrize("env, vendor, flags, system, want", [
    ({}, "AuthenticAMD", "avx2 fma avx512f", "Linux", None),
    ({}, "AuthenticAMD", "avx2 fma", "Linux", None),
    ({runtime.MKL_SWITCH: "0"}, "AuthenticAMD", "avx2 fma", "Linux", "HM4SR_MKL_INTEL_PATHS=0"),
    ({runtime.MKL_SWITCH: "off"}, "AuthenticAMD", "avx2 fma", "Linux", "HM4SR_MKL_INTEL_PATHS=off"),
    ({}, "GenuineIntel", "avx2 fma avx512f", "Linux", "the CPU is GenuineIntel"),
    ({runtime.MKL_SWITCH: "1"}, "GenuineIntel", "avx2 fma", "Linux", None),
    ({runtime.MKL_SWITCH: "force"}, "HygonGenuine", "avx2 fma", "Linux", None),
    ({}, "HygonGenuine", "avx2 fma", "Linux", "the CPU is HygonGenuine"),
    ({}, "AuthenticAMD", "sse4_2", "Linux", "without AVX2"),
    ({}, "AuthenticAMD", "avx2 fma", "Darwin", "not needed on Darwin"),
    ({runtime.MKL_SWITCH: "1"}, "AuthenticAMD", "avx2 fma", "Windows", "not needed on Windows"),
])
def test_the_mkl_library_is_wanted_only_on_an_amd_cpu_with_avx2_unless_switched(env, vendor, flags, system, want):
    why = runtime.mkl_shim_wanted(env=env, cpuinfo=CPUINFO.format(vendor=vendor, flags=flags), system=system,
                                  machine="x86_64")
    assert why is None if want is None else want in why


def test_cpuinfo_gives_the_first_cpus_vendor_and_flags():
    assert runtime.cpu_vendor_and_flags(CPUINFO.format(vendor="AuthenticAMD", flags="avx2 fma")) == \
        ("AuthenticAMD", {"fpu", "sse2", "avx2", "fma"})
    assert runtime.cpu_vendor_and_flags("") == (None, set())


def test_the_cache_folder_is_an_absolute_path_or_an_error():
    assert runtime.cache_dir({"XDG_CACHE_HOME": "/x/cache", "HOME": "/home/u"}) == Path("/x/cache/hm4sr")
    assert runtime.cache_dir({"XDG_CACHE_HOME": "rel", "HOME": "/home/u"}) == Path("/home/u/.cache/hm4sr")
    with pytest.raises(OSError, match="absolute"):
        runtime.cache_dir({"XDG_CACHE_HOME": "rel", "HOME": "~"})


def test_the_compiler_comes_from_cc_with_its_arguments_else_from_path(tmp_path, monkeypatch):
    fake = tmp_path / "mycc"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert runtime.find_compiler({"CC": f"{fake} -m64"}) == [str(fake), "-m64"]
    assert runtime.find_compiler({"CC": "no-such-wrapper-hm4sr gcc"}) is None  # nothing on this PATH
    (tmp_path / "cc").symlink_to(fake)
    assert runtime.find_compiler({"CC": "no-such-wrapper-hm4sr gcc"}) == [str(tmp_path / "cc")]


@pytest.mark.skipif(not CAN_LOAD, reason="needs a C compiler on x86-64 Linux")
def test_the_library_is_compiled_once_into_a_private_cache_and_exports_the_one_function(tmp_path):
    import ctypes
    path = runtime.build_mkl_shim(tmp_path / "cache")
    assert path.parent == tmp_path / "cache" and path.name == runtime.MKL_SHIM_NAME
    assert sorted(p.name for p in path.parent.iterdir()) == [runtime.MKL_SHIM_NAME]  # no scratch left behind
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o755
    assert ctypes.CDLL(str(path)).mkl_serv_intel_cpu_true() == 1
    stamp = path.stat().st_mtime_ns
    assert runtime.build_mkl_shim(tmp_path / "cache", compiler=["no-such-compiler"]) == path  # reused, not rebuilt
    assert path.stat().st_mtime_ns == stamp
    path.chmod(0o777)  # a file others may have written is never loaded
    with pytest.raises(OSError, match="others may write"):
        runtime.build_mkl_shim(tmp_path / "cache")


@pytest.mark.skipif(not CAN_LOAD, reason="needs a C compiler on x86-64 Linux")
def test_a_build_under_a_permissive_umask_is_still_loaded_next_time(tmp_path):
    old = os.umask(0o002)
    try:
        path = runtime.build_mkl_shim(tmp_path / "cache")
    finally:
        os.umask(old)
    assert runtime.build_mkl_shim(tmp_path / "cache", compiler=["no-such-compiler"]) == path


def test_a_missing_or_failing_compiler_is_an_oserror_that_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(OSError, match="no C compiler"):
        runtime.build_mkl_shim(tmp_path / "cache")
    monkeypatch.undo()
    if shutil.which("false") is None:
        pytest.skip("no `false` command")
    with pytest.raises(OSError, match="failed on shim.c"):
        runtime.build_mkl_shim(tmp_path / "cache", compiler=[shutil.which("false")])
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


MKL_REPORT = ("import json, os; from hm4sr_core import runtime; r = runtime.configure_process(); import torch; "
              "from hm4sr_core.provenance import environment; e = environment(); "
              "print(json.dumps([r['mkl_intel_paths'], e['mkl_intel_paths'], e['mkl_code_path']]))")
PLAIN_CODE_PATH = "import torch; from hm4sr_core.provenance import mkl_code_path; print(mkl_code_path())"


def _mkl_env(cache: Path, **set_vars) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (runtime.MKL_SWITCH, "LD_PRELOAD", "XDG_CACHE_HOME")}
    env.update(set_vars, PYTHONPATH=str(ROOT), XDG_CACHE_HOME=str(cache))
    return env


def _mkl_child(code: str, cache: Path, **set_vars):
    import json
    done = subprocess.run([sys.executable, "-c", code], env=_mkl_env(cache, **set_vars), capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_configure_process_loads_the_library_on_an_amd_cpu_and_every_result_records_it(tmp_path):
    plain = _mkl_child(PLAIN_CODE_PATH, tmp_path)
    state, recorded, code_path = _mkl_child(MKL_REPORT, tmp_path)
    assert recorded == state["on"]
    if not (AMD_WITH_MKL and HAS_CC):
        assert state["on"] is False and state["why"] and code_path == plain
    else:
        assert state["on"] is True, state
        assert Path(state["library"]).parent == tmp_path / "hm4sr"
        if plain is not None:  # torch with MKL: it now runs another code path than MKL's generic one
            assert plain == 0 and code_path not in (None, 0), (plain, code_path)
    switched = _mkl_child(MKL_REPORT, tmp_path, HM4SR_MKL_INTEL_PATHS="0")
    assert switched[0] == {"on": False, "why": "HM4SR_MKL_INTEL_PATHS=0", "library": None}
    assert switched[2] == plain


@pytest.mark.skipif(not CAN_LOAD, reason="needs a C compiler on x86-64 Linux")
def test_the_forced_switch_loads_it_on_any_x86_cpu_and_a_planted_file_is_refused(tmp_path):
    state, recorded, _ = _mkl_child(MKL_REPORT, tmp_path, HM4SR_MKL_INTEL_PATHS="1")
    assert state["on"] is True and recorded is True and state["library"].startswith(str(tmp_path))
    Path(state["library"]).chmod(0o666)  # as if another user had written it
    state, recorded, _ = _mkl_child(MKL_REPORT, tmp_path, HM4SR_MKL_INTEL_PATHS="1")
    assert state["on"] is False and recorded is False and "others may write" in state["why"]


def test_a_late_call_leaves_mkl_alone_and_says_why(tmp_path):
    code = ("import json, torch; from hm4sr_core import runtime; r = runtime.configure_process(); "
            "from hm4sr_core.provenance import mkl_code_path; print(json.dumps([r['mkl_intel_paths'], mkl_code_path()]))")
    plain = _mkl_child(PLAIN_CODE_PATH, tmp_path)
    state, code_path = _mkl_child(code, tmp_path, HM4SR_MKL_INTEL_PATHS="1" if LINUX_X86 else "")
    assert state["on"] is False and code_path == plain
    if LINUX_X86:
        assert "torch was imported before" in state["why"]


@pytest.mark.skipif(not CAN_LOAD, reason="needs a C compiler on x86-64 Linux")
def test_children_started_in_the_preload_block_get_the_library_and_record_it(tmp_path):
    """multiprocessing's spawn imports torch before any workbench code: LD_PRELOAD carries
    the library to it, the child's records say so, and the parent's LD_PRELOAD (here one
    naming libc) is as it was afterwards."""
    child = ("import json, torch; from hm4sr_core import runtime; from hm4sr_core.provenance import mkl_code_path; "
             "print(json.dumps([runtime.mkl_state(), mkl_code_path()]))")
    code = ("import json, os, subprocess, sys; from hm4sr_core import runtime; runtime.configure_process()\n"
            "before = os.environ.get('LD_PRELOAD')\n"
            "with runtime.children_preload():\n"
            f"    out = subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True,"
            " check=True).stdout\n"
            "print(json.dumps([before, os.environ.get('LD_PRELOAD'), json.loads(out), runtime.preload_environment()]))")
    before, after, (state, code_path), extra = _mkl_child(code, tmp_path, HM4SR_MKL_INTEL_PATHS="1",
                                                          LD_PRELOAD="libc.so.6")
    assert before == after == "libc.so.6"
    assert extra["LD_PRELOAD"].split() == [str(tmp_path / "hm4sr" / runtime.MKL_SHIM_NAME), "libc.so.6"]
    assert state["on"] is True and "LD_PRELOAD" in state["why"]
    if AMD_WITH_MKL:
        assert code_path not in (None, 0)


def test_matrix_products_stay_within_the_float32_error_bound_of_a_float64_reference(tmp_path):
    """Whatever code path MKL runs here (its AVX-512 one on an AMD CPU with the library),
    a float32 product stays within the error bound of a K-term float32 dot product,
    |error| <= K * eps * sum_k |a_ik| |b_kj| (eps = 2^-24), for the shapes of a training step:
    forward, input gradient and weight gradient of 64-, 192- and 256-wide layers. The bound
    is loose (errors are typically far below it): this catches a wrong kernel, not a
    different rounding."""
    code = ("import json; from hm4sr_core import runtime; runtime.configure_process(); import torch\n"
            "torch.manual_seed(0); worst = 0.0\n"
            "for m, k, n in [(5000, 64, 192), (5000, 64, 256), (5000, 256, 64), (64, 5000, 256), (192, 5000, 64),"
            " (1024, 192, 1683)]:\n"
            "    a, b = torch.randn(m, k), torch.randn(k, n)\n"
            "    for got in (a @ b, torch.addmm(torch.zeros(n), a, b), (b.T @ a.T).T):\n"
            "        err = (got.double() - a.double() @ b.double()).abs()\n"
            "        bound = k * 2.0 ** -24 * (a.double().abs() @ b.double().abs())\n"
            "        worst = max(worst, float((err / bound).max()))\n"
            "print(json.dumps(worst))")
    worst = _mkl_child(code, tmp_path)
    assert 0 < worst <= 1.0, worst
