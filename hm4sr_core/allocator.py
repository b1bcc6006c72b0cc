"""Keep freed memory in the process instead of handing it back to the kernel (glibc only).

By default glibc serves every allocation above 32 MB with a fresh ``mmap`` and returns
it with ``munmap`` when freed. A training step allocates and frees hundreds of such
tensors (a (1024, 50, 768) float tensor is 157 MB), so every step pays page faults and
kernel page zeroing for memory it just gave back: on the 2-core machines here an
elementwise multiply of two 60 MB tensors took 61 ms that way and 7 ms with the
thresholds below (``python -m benchmarks.run --only allocator`` measures it). Raising glibc's
mmap and trim thresholds makes freed blocks reusable, which is what PyTorch's own GPU
caching allocator does for device memory. Peak RSS is unchanged in kind (the high-water
mark is kept rather than returned), which the benchmarks measure.

Applied once when ``hm4sr_core`` is imported; set ``HM4SR_SYSTEM_MALLOC=1`` to leave
the allocator alone. A no-op where glibc is absent (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # allocations up to 1 GiB come from the reusable heap
TRIM_THRESHOLD = 1 << 32  # keep up to 4 GiB of free heap instead of returning it

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap/trim thresholds once; True if they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("HM4SR_SYSTEM_MALLOC", "") not in ("", "0"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt takes an int: 4 GiB does not fit, so the trim threshold is capped at 2 GiB - 1.
    mmap_threshold = int(float(os.environ.get("HM4SR_MMAP_THRESHOLD_MB", MMAP_THRESHOLD / 2**20)) * 2**20)
    ok = mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok = mallopt(M_TRIM_THRESHOLD, min(TRIM_THRESHOLD, 2**31 - 1)) == 1 and ok
    _applied = ok
    return ok


def _measure(repeats: int = 21) -> dict[str, float]:
    """Median seconds of a 15M-element float multiply with the current allocator."""
    import time

    import torch
    torch.set_num_threads(1)
    x = torch.randn(3072, 2, 50, 50)
    y = torch.rand_like(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x * y
        times.append(time.perf_counter() - t)
    return {"multiply_seconds_median": sorted(times)[repeats // 2]}

