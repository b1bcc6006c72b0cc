"""Keep freed memory in the process instead of handing it back to the kernel (glibc only).

By default glibc serves every allocation above 32 MB with a fresh ``mmap`` and returns
it with ``munmap`` when freed. A training step allocates and frees hundreds of such
tensors (a (1024, 50, 768) float tensor is 157 MB), so every step pays page faults and
kernel page zeroing for memory it just gave back: on the 2-core machines here a
15M-element float multiply took 54.8 ms that way and 8.4 ms with the thresholds below
(``python -m benchmarks.run --only allocator``). Raising glibc's mmap and trim thresholds
makes freed blocks reusable, which is what PyTorch's own GPU caching allocator does for
device memory. The price is memory: freed blocks stay in the process (up to 2 GiB at the
top of the heap) and fragmentation can raise the peak; the benchmarks record peak RSS.

Applied once when ``hm4sr_core`` is imported; set ``HM4SR_SYSTEM_MALLOC=1`` to leave
the allocator alone, or ``HM4SR_MMAP_THRESHOLD_MB`` (default 1024) to serve allocations
above that size by ``mmap`` again. A no-op where glibc is absent (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import warnings

M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # allocations up to 1 GiB come from the reusable heap
TRIM_THRESHOLD = 2**31 - 1  # keep up to 2 GiB of free heap (mallopt takes a C int)

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
    _applied = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _applied


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

