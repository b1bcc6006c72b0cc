"""Where a result came from: library versions, the machine, the code's git state.

The one place every record takes its provenance from: training results
(``results.json``'s ``environment``), the notebook runner's manifest, and the benchmarks'
results and history. Timings differ between CPUs of the same architecture (the fast paths
were tuned on an Intel CPU and measured again on an AMD EPYC), so the machine part names
the CPU model, vendor and family, not only ``x86_64``.

Nothing here changes the process; every function reads and returns plain JSON values.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from . import __version__, runtime

SOURCE_TREE = Path(__file__).resolve().parents[1]  # a clone or an editable install; site-packages otherwise
CORE_PACKAGES = ("torch", "numpy", "pandas", "scipy")
# CPU features that change which kernels torch runs (AVX-512, bf16 units for amp on a CPU).
CPU_FLAGS_OF_NOTE = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
_CPUINFO = Path("/proc/cpuinfo")


# ----------------------------------------------------------------------------- versions


def versions(packages: tuple[str, ...] = CORE_PACKAGES) -> dict[str, str | None]:
    """Python, hm4sr_core and each installed distribution of ``packages`` (None where one is
    not installed), read from the installed metadata: nothing is imported."""
    out: dict[str, str | None] = {"python": platform.python_version(), "hm4sr_core": __version__}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ----------------------------------------------------------------------------- machine


def parse_cpuinfo(text: str) -> dict:
    """The CPU of a ``/proc/cpuinfo`` text: model name, vendor, family/model/stepping, the
    number of physical cores (distinct (physical id, core id) pairs; None where the kernel
    does not say) and which of :data:`CPU_FLAGS_OF_NOTE` it has. Keys the text lacks are None
    (ARM kernels name no model here: :func:`cpu` asks ``lscpu`` then)."""
    first: dict[str, str] = {}
    cores = set()
    physical = core = None
    for line in text.splitlines() + [""]:
        key, sep, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if not sep:  # a blank line ends one logical CPU's block
            if physical is not None and core is not None:
                cores.add((physical, core))
            physical = core = None
            continue
        first.setdefault(key, value)
        if key == "physical id":
            physical = value
        elif key == "core id":
            core = value
    flags = set((first.get("flags") or first.get("features") or "").split())
    return {"cpu_model": first.get("model name") or None, "cpu_vendor": first.get("vendor_id") or None,
            "cpu_family": first.get("cpu family") or None, "cpu_model_number": first.get("model") or None,
            "cpu_stepping": first.get("stepping") or None, "physical_cores": len(cores) or None,
            "cpu_flags": [f for f in CPU_FLAGS_OF_NOTE if f in flags]}


def _command_output(*args: str) -> str | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def cpu() -> dict:
    """This machine's CPU (:func:`parse_cpuinfo`'s keys): from /proc/cpuinfo on Linux, the
    model name from ``lscpu`` where cpuinfo has none (ARM), from ``sysctl`` on macOS, else
    ``platform.processor()``."""
    try:
        info = parse_cpuinfo(_CPUINFO.read_text(errors="replace"))
    except OSError:
        info = parse_cpuinfo("")
    if info["cpu_model"] is None:
        listing = _command_output("lscpu") or ""
        found = re.search(r"^Model name:\s*(.+)$", listing, re.MULTILINE)
        if found is None and sys.platform == "darwin":
            brand = (_command_output("sysctl", "-n", "machdep.cpu.brand_string") or "").strip()
            info["cpu_model"] = brand or None
        elif found is not None:
            info["cpu_model"] = found.group(1).strip()
    if info["cpu_model"] is None:
        info["cpu_model"] = platform.processor() or None
    return info


def usable_cpus() -> int | None:
    """The logical CPUs this process may run on (its affinity; os.cpu_count() where the
    platform has no affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def machine() -> dict:
    """Operating system, architecture, CPU model and counts."""
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), **cpu(),
            "cpu_count": os.cpu_count(), "cpus_usable": usable_cpus()}


def mkl_code_path() -> int | None:
    """MKL's own number for the code path it runs in this process
    (``mkl_serv_cpu_detect`` in torch's CPU library): 0 is its generic path (what it runs
    on an AMD CPU by default), 7 its AVX-512 path (what it ran on the AMD EPYC with
    :func:`hm4sr_core.runtime.mkl_intel_paths`). None where torch has no MKL or does not
    export it (a build with another BLAS, macOS, Windows)."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).resolve().parent / "lib" / "libtorch_cpu.so"))
        detect = lib.mkl_serv_cpu_detect
    except (OSError, AttributeError):
        return None
    detect.argtypes, detect.restype = [], ctypes.c_int
    return int(detect())


# ----------------------------------------------------------------------------- git


def git_state(root: str | Path = SOURCE_TREE, paths: tuple[str, ...] = ()) -> dict:
    """The commit ``root``'s checkout is at and whether tracked files (under ``paths``, when
    given) have uncommitted changes: ``{"commit": full hash, "dirty": bool}``, None for both
    where ``root`` is not a git checkout (an installed wheel, an extracted archive) or git is
    missing."""
    root = Path(root)
    if not (root / ".git").exists():
        return {"commit": None, "dirty": None}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no", "--", *paths)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


# ----------------------------------------------------------------------------- one record


def environment(packages: tuple[str, ...] = CORE_PACKAGES) -> dict:
    """Everything a result records about where it was made: :func:`versions`,
    :func:`machine`, the process's torch threads, OpenMP variables, allocator setting and
    MKL code path (:mod:`hm4sr_core.runtime`, :func:`mkl_code_path`), and the code's
    :func:`git_state` under ``"git"``."""
    mkl = runtime.mkl_state()
    return {**versions(packages), **machine(), "torch_threads": torch.get_num_threads(),
            **runtime.openmp_settings(), "allocator_kept": runtime.allocator_kept(),
            "mkl_intel_paths": mkl["on"], "mkl_intel_paths_why": mkl["why"], "mkl_code_path": mkl_code_path(),
            "git": git_state()}
