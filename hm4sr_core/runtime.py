"""Process-wide runtime settings of the workbench, applied by one explicit call.

``import hm4sr_core`` changes nothing outside the package. The programs of the workbench
(the ``hm4sr`` command, the notebook runner and its kernels, ``make lab`` and the
benchmarks) call :func:`configure_process` first; a library user who wants the same
speed calls it too, before importing torch. Two settings, both measured on the 2-core
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

``python -m hm4sr_core.runtime COMMAND ...`` runs a command with the OpenMP setting in its
environment (``make lab`` starts JupyterLab that way, so its kernels inherit it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time
import warnings

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


# ----------------------------------------------------------------------------- the one call


def configure_process(openmp: bool = True, allocator: bool = True) -> dict:
    """Apply the workbench's runtime settings to this process (and, for OpenMP, its children).

    Call it first thing, before torch is imported: libgomp reads its variables when torch
    loads it, so the OpenMP part of a call made later reaches child processes only (the
    returned ``openmp_in_effect`` says so). Returns what was set, for logs and records."""
    added = openmp_defaults() if openmp else {}
    os.environ.update(added)
    return {"openmp_added": added, "openmp_in_effect": openmp and "torch" not in sys.modules,
            "allocator_kept": keep_freed_memory() if allocator else allocator_kept()}


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
    """``python -m hm4sr_core.runtime COMMAND [ARGS...]``: exec COMMAND with the OpenMP setting."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m hm4sr_core.runtime COMMAND [ARGS...]\n\nRun COMMAND with the workbench's "
              f"OpenMP setting in its environment (GOMP_SPINCOUNT={SPIN_COUNT} unless OMP_WAIT_POLICY or "
              "GOMP_SPINCOUNT is already set); see the module docstring for why.")
        return 0 if argv else 2
    os.environ.update(openmp_defaults())
    try:
        os.execvp(argv[0], argv)
    except OSError as err:
        print(f"python -m hm4sr_core.runtime: cannot run {argv[0]!r}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
