"""Process-wide runtime settings of the workbench, applied by one explicit call.

``import hm4sr_core`` changes nothing outside the package. The programs of the workbench
(the ``hm4sr`` command, the notebook runner and its kernels, ``make lab`` and the
benchmarks) call :func:`configure_process` first; a library user who wants the same
speed calls it too, before importing torch. Three settings, each measured on the 2-core
machines this project runs on (docs/performance.md):

**OpenMP wait policy** (libgomp, Linux). A worker thread that finishes its share of a
parallel region waits for the next one. libgomp's default spins for a long time first
(``GOMP_SPINCOUNT`` 300,000), which wastes the CPU when other processes need it;
``OMP_WAIT_POLICY=PASSIVE`` sleeps at once, and then every region pays a wake-up.
Dense-mode training runs many small operations per step: on 2 idle cores its epochs took
1.65 times as long under PASSIVE as with the default, while 10,000 spins were as fast as
the default; on a machine loaded with four busy loops they took 1.3 times PASSIVE's time,
while the default had not finished after about 3 minutes where PASSIVE took 67 s
(``python -m benchmarks.omp_wait``). libgomp reads the variables once, when torch is
first imported, so the setting must be made before that; child processes inherit it. A
choice of the user's (either variable set) is left as it is; ``make test``, which runs
many processes at once, sets PASSIVE.

**Freed memory kept for reuse** (glibc only). By default glibc serves every allocation
above 32 MB with a fresh ``mmap`` and returns it with ``munmap`` when freed. A training
step allocates and frees hundreds of such tensors (a (1024, 50, 768) float tensor is
157 MB), so every step pays page faults and kernel page zeroing for memory it just gave
back: a 15M-element float multiply took 54.8 ms that way and 8.4 ms with the thresholds
below (``python -m benchmarks.run --only allocator``). Raising glibc's mmap and trim
thresholds makes freed blocks reusable, as PyTorch's own GPU caching allocator does for
device memory. The price is memory: freed blocks stay in the process (up to 2 GiB at the
top of the heap); the benchmarks record peak RSS. ``HM4SR_SYSTEM_MALLOC=1`` leaves the
allocator alone; ``HM4SR_MMAP_THRESHOLD_MB`` (default 1024) serves allocations above
that size by ``mmap`` again. A no-op where glibc is absent (macOS, musl, Windows).

**MKL's own code paths on AMD CPUs** (Linux x86-64). torch's CPU wheel does its matrix
products in Intel MKL (2024.2 in torch 2.13), which picks its kernels by CPU vendor: on an
AMD CPU it runs a generic path that copies both operands into packed panels before every
product and never uses AVX-512, even where the CPU has it (a Zen 4 EPYC does). MKL asks one
function of its own, ``mkl_serv_intel_cpu_true``, whether the CPU is an Intel one, and calls
it through the dynamic linker, so a one-line library defining it (returning 1), loaded
before torch, makes MKL choose by the CPU's features instead, as it does on Intel. On the
2-core AMD EPYC a prefix-mode epoch took 0.875-0.948 of its time that way, three rounds each
paired with an epoch of the code before (docs/performance.md, "MKL's code paths on an AMD
CPU"). The products round differently from MKL's generic path in some shapes (each is
still an ordinary float32 product, within the K-term float32 error bound of a float64
reference: tested), so results on an AMD CPU change in their last bits. The library is
compiled once with the system's C compiler into the user's cache (``$XDG_CACHE_HOME/hm4sr``,
else ``~/.cache/hm4sr``; the folder private to the user, a file others could have written
refused) and loaded from there; without a compiler, on an Intel CPU or another system,
nothing happens. ``HM4SR_MKL_INTEL_PATHS=0`` leaves MKL's choice alone; ``=1`` loads it on
any x86-64 Linux CPU (a Hygon, which MKL treats as AMD). :func:`mkl_intel_paths` says what
happened and why; every result records it (``hm4sr_core.provenance``).

``python -m hm4sr_core.runtime COMMAND ...`` runs a command with the OpenMP setting and the
MKL library (``LD_PRELOAD``) in its environment (``make lab`` starts JupyterLab that way, so
its kernels inherit both).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# ----------------------------------------------------------------------------- OpenMP

SPIN_COUNT = "10000"
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def openmp_defaults(env=None) -> dict[str, str]:
    """The variables to add to ``env`` (default ``os.environ``): ``GOMP_SPINCOUNT`` unless
    ``env`` already sets a wait policy or a spin count."""
    env = os.environ if env is None else env
    if any(name in env for name in OPENMP_VARIABLES):
        return {}
    return {"GOMP_SPINCOUNT": SPIN_COUNT}


def openmp_settings(env=None) -> dict[str, str | None]:
    """The two variables as ``env`` has them (None where unset), for result records."""
    env = os.environ if env is None else env
    return {name: env.get(name) for name in OPENMP_VARIABLES}


# ----------------------------------------------------------------------------- allocator

M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # allocations up to 1 GiB come from the reusable heap
TRIM_THRESHOLD = 2**31 - 1  # keep up to 2 GiB of free heap (mallopt takes a C int)

_allocator_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap/trim thresholds once in this process; True if they are in effect."""
    global _allocator_applied
    if _allocator_applied is not None:
        return _allocator_applied
    _allocator_applied = False
    if os.environ.get("HM4SR_SYSTEM_MALLOC", "") not in ("", "0"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    text = os.environ.get("HM4SR_MMAP_THRESHOLD_MB", "")
    mmap_threshold = MMAP_THRESHOLD
    if text:
        try:
            mb = float(text)
        except ValueError:
            mb = -1.0
        if not 0 < mb < 2048:  # mallopt takes a C int: 2 GiB and more would wrap around
            warnings.warn(f"HM4SR_MMAP_THRESHOLD_MB={text!r}: expected a number of MiB in (0, 2048); "
                          f"using {MMAP_THRESHOLD >> 20}", RuntimeWarning, stacklevel=2)
        else:
            mmap_threshold = int(mb * 2**20)
    if mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1:
        return False
    _allocator_applied = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _allocator_applied


def allocator_kept() -> bool:
    """Whether :func:`keep_freed_memory` is in effect in this process (for result records)."""
    return bool(_allocator_applied)


# ----------------------------------------------------------------------------- MKL on AMD CPUs

MKL_SWITCH = "HM4SR_MKL_INTEL_PATHS"  # 0/off: leave MKL alone; 1/force: load it on any x86-64 Linux CPU
MKL_SHIM_SOURCE = (
    "/* hm4sr_core.runtime: MKL asks this whether the CPU is an Intel one before it picks its\n"
    "   kernels; saying yes makes it pick them by the CPU's features, as it does on Intel. */\n"
    "int mkl_serv_intel_cpu_true(void) { return 1; }\n")
MKL_SHIM_NAME = f"libhm4sr_mkl_intel_paths-{hashlib.sha256(MKL_SHIM_SOURCE.encode()).hexdigest()[:12]}.so"
COMPILE_TIMEOUT = 60

_mkl_state: dict | None = None


def cpu_vendor_and_flags(cpuinfo: str | None = None) -> tuple[str | None, set[str]]:
    """The first CPU's ``vendor_id`` and flags in a /proc/cpuinfo text (read here when None)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return None, set()
    vendor, flags = None, set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key == "vendor_id" and vendor is None:
            vendor = value.strip()
        elif sep and key == "flags" and not flags:
            flags = set(value.split())
        if vendor is not None and flags:
            break
    return vendor, flags


def mkl_shim_wanted(env=None, cpuinfo: str | None = None, system: str | None = None,
                    machine: str | None = None) -> str | None:
    """None when the MKL library should be loaded here, else why not (one phrase).
    ``HM4SR_MKL_INTEL_PATHS=1`` (or ``force``) loads it on any x86-64 Linux CPU: a CPU of
    another vendor that MKL treats as AMD (Hygon), or a test on an Intel CPU, where it
    changes nothing."""
    env = os.environ if env is None else env
    switch = env.get(MKL_SWITCH, "").strip().lower()
    if switch in ("0", "off", "false", "no"):
        return f"{MKL_SWITCH}={env[MKL_SWITCH]}"
    system = platform.system() if system is None else system
    machine = platform.machine() if machine is None else machine
    if system != "Linux" or machine not in ("x86_64", "AMD64"):
        return f"not needed on {system} {machine}"
    if switch in ("1", "force", "on", "true", "yes"):
        return None
    vendor, flags = cpu_vendor_and_flags(cpuinfo)
    if vendor != "AuthenticAMD":
        return f"not needed: the CPU is {vendor or 'of unknown vendor'}, MKL chooses by its features already"
    if not {"avx2", "fma"} <= flags:
        return "an AMD CPU without AVX2 and FMA: MKL's generic path kept"
    return None


def cache_dir(env=None) -> Path:
    """Where the workbench keeps what it builds for this user: ``$XDG_CACHE_HOME/hm4sr``, else
    ``~/.cache/hm4sr``; an absolute path (a relative ``XDG_CACHE_HOME`` is ignored, as the
    XDG specification says). Raises OSError when there is no absolute home to put it in."""
    env = os.environ if env is None else env
    xdg = env.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "hm4sr"
    home = env.get("HOME") or os.path.expanduser("~")
    if not os.path.isabs(home):
        raise OSError("no absolute $XDG_CACHE_HOME or $HOME to keep the library in")
    return Path(home) / ".cache" / "hm4sr"


def find_compiler(env=None) -> list[str] | None:
    """The C compiler command: ``$CC`` (may carry arguments, e.g. ``ccache gcc``) when its
    program is on PATH, else ``cc`` or ``gcc``; None when there is none."""
    env = os.environ if env is None else env
    if env.get("CC"):
        try:
            words = shlex.split(env["CC"])
        except ValueError:
            words = []
        if words and shutil.which(words[0]):
            return words
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _private(path: Path) -> bool:
    """True when ``path`` belongs to this user and nobody else may write to it: a library
    loaded into the process runs its code there, so only one of the user's own is loaded."""
    info = path.stat()
    return info.st_uid == os.geteuid() and not info.st_mode & 0o022


def build_mkl_shim(folder: Path | None = None, compiler: list[str] | None = None) -> Path:
    """The compiled library of :data:`MKL_SHIM_SOURCE` in ``folder`` (default
    :func:`cache_dir`), compiled with :func:`find_compiler`'s compiler the first time: in a
    scratch folder beside it, loaded once there as a check, then renamed into place, so two
    processes building at once both get a whole, working file. The folder is made private
    to the user (mode 700); a folder or file that another user owns or may write to is
    refused. Raises OSError naming what failed (no compiler, the folder, the compiler's
    own message)."""
    folder = cache_dir() if folder is None else Path(folder)
    target = folder / MKL_SHIM_NAME
    if target.is_file():
        if not (_private(folder) and _private(target)):
            raise OSError(f"{target}: not this user's own, or others may write to it; not loaded")
        return target
    cc = compiler or find_compiler()
    if not cc:
        raise OSError("no C compiler (cc or gcc on PATH, or $CC) to build a 1-line library")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _private(folder):
        raise OSError(f"{folder}: not this user's own, or others may write to it; no library built there")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as scratch:
        source, built = Path(scratch) / "shim.c", Path(scratch) / MKL_SHIM_NAME
        source.write_text(MKL_SHIM_SOURCE)
        try:
            done = subprocess.run([*cc, "-shared", "-fPIC", "-O2", "-o", str(built), str(source)],
                                  capture_output=True, text=True, errors="replace", timeout=COMPILE_TIMEOUT)
        except subprocess.TimeoutExpired as err:
            raise OSError(f"{' '.join(cc)} took over {COMPILE_TIMEOUT} s to compile {source.name}") from err
        if done.returncode != 0 or not built.is_file():
            raise OSError(f"{' '.join(cc)} failed on {source.name} (exit {done.returncode}): "
                          f"{(done.stderr or done.stdout).strip()[-500:]}")
        if ctypes.CDLL(str(built)).mkl_serv_intel_cpu_true() != 1:  # loads here (a foreign build would not)
            raise OSError(f"{' '.join(cc)} built a library whose function does not answer 1")
        built.chmod(0o755)  # whatever the umask (002 makes it group-writable, which a later load refuses)
        os.replace(built, target)
    return target


def _preloaded(env=None) -> dict | None:
    """The state of a process whose ``LD_PRELOAD`` names the workbench's library (``make lab``'s
    kernels, DDP ranks); None when it does not."""
    env = os.environ if env is None else env
    for entry in env.get("LD_PRELOAD", "").replace(":", " ").split():
        if os.path.basename(entry) == MKL_SHIM_NAME and os.path.isfile(entry):
            return {"on": True, "why": "preloaded by the parent process (LD_PRELOAD)", "library": entry}
    return None


def mkl_intel_paths() -> dict:
    """Load the one-line library that lets MKL choose its kernels by the CPU's features on an
    AMD CPU (module docstring), once per process and only before torch is imported.

    Returns ``{"on": bool, "why": str, "library": path or None}``: ``why`` says what was
    done or why not (the switch, another vendor, torch imported first, no compiler, ...).
    Never raises: without the library MKL keeps its generic path, slower but correct."""
    global _mkl_state
    if _mkl_state is None:
        _mkl_state = _preloaded() or _load_mkl_shim()
    return _mkl_state


def _load_mkl_shim() -> dict:
    reason = mkl_shim_wanted()
    if reason is None and "torch" in sys.modules:
        reason = "torch was imported before the settings were applied (MKL has chosen its path by then)"
    if reason is not None:
        return {"on": False, "why": reason, "library": None}
    try:
        path = build_mkl_shim()
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except Exception as err:  # noqa: BLE001 - whatever fails, MKL's generic path is kept and the record says why
        return {"on": False, "why": f"not loaded: {err}", "library": None}
    return {"on": True, "why": "loaded: MKL chooses its kernels by the CPU's features", "library": str(path)}


def mkl_state() -> dict:
    """What :func:`mkl_intel_paths` did in this process, for result records: "preloaded" when
    it was not called but ``LD_PRELOAD`` brought the library, else "not requested"."""
    if _mkl_state is not None:
        return _mkl_state
    return _preloaded() or {"on": False, "why": "not requested", "library": None}


def preload_environment(env=None) -> dict[str, str]:
    """``LD_PRELOAD`` for a child process that must run MKL's products as this one does even
    if its code does not load the library itself (an older revision of the workbench,
    multiprocessing's spawn): this process's library first, then ``env``'s preload list; {}
    when it is not loaded, or when its path holds a space or a colon (the loader splits
    ``LD_PRELOAD`` there)."""
    env = os.environ if env is None else env
    state = mkl_state()
    library = state["library"]
    if not state["on"] or not library or any(c in library for c in " :"):
        return {}
    present = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p != library]
    return {"LD_PRELOAD": " ".join([library, *present])}


@contextlib.contextmanager
def children_preload():
    """Within the block, processes started from this one (multiprocessing's spawn, which
    imports torch before any workbench code runs) load this process's MKL library too:
    ``LD_PRELOAD`` is set for the block and restored after it. Nothing when it is not loaded."""
    extra = preload_environment()
    if not extra:
        yield
        return
    before = os.environ.get("LD_PRELOAD")
    os.environ.update(extra)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = before


# ----------------------------------------------------------------------------- the one call


def configure_process(openmp: bool = True, allocator: bool = True, mkl: bool = True) -> dict:
    """Apply the workbench's runtime settings to this process (and, for OpenMP, its children).

    Call it first thing, before torch is imported: libgomp reads its variables when torch
    loads it, so the OpenMP part of a call made later reaches child processes only (the
    returned ``openmp_in_effect`` says so), and MKL has chosen its code path by then (the
    returned ``mkl_intel_paths`` says why it was left alone). Returns what was set, for
    logs and records."""
    openmp_in_effect = openmp and "torch" not in sys.modules
    added = openmp_defaults() if openmp else {}
    os.environ.update(added)
    return {"openmp_added": added, "openmp_in_effect": openmp_in_effect,
            "allocator_kept": keep_freed_memory() if allocator else allocator_kept(),
            "mkl_intel_paths": mkl_intel_paths() if mkl else mkl_state()}


def _measure_multiply(repeats: int = 21) -> dict[str, float]:
    """Median seconds of a 15M-element float multiply with the current allocator."""
    import torch  # here, not at the top: importing this module must not load torch (see above)

    torch.set_num_threads(1)
    x = torch.randn(3072, 2, 50, 50)
    y = torch.rand_like(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x * y
        times.append(time.perf_counter() - t)
    return {"multiply_seconds_median": sorted(times)[repeats // 2]}


def main(argv: list[str] | None = None) -> int:
    """``python -m hm4sr_core.runtime COMMAND [ARGS...]``: exec COMMAND with the OpenMP setting
    and, on an AMD CPU, MKL's library preloaded."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m hm4sr_core.runtime COMMAND [ARGS...]\n\nRun COMMAND with the workbench's "
              f"OpenMP setting in its environment (GOMP_SPINCOUNT={SPIN_COUNT} unless OMP_WAIT_POLICY or "
              "GOMP_SPINCOUNT is already set) and, on an AMD CPU, the library that lets MKL choose its "
              f"kernels by the CPU's features in LD_PRELOAD (unless {MKL_SWITCH}=0), so every Python "
              "started under COMMAND (a JupyterLab's kernels) gets both; see the module docstring for why.")
        return 0 if argv else 2
    os.environ.update(openmp_defaults())
    mkl_intel_paths()
    os.environ.update(preload_environment())
    try:
        os.execvp(argv[0], argv)
    except OSError as err:
        print(f"python -m hm4sr_core.runtime: cannot run {argv[0]!r}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
