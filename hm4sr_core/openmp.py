"""How long torch's OpenMP worker threads spin before they sleep (libgomp, on Linux).

A worker that finishes its share of a parallel region waits for the next one. libgomp's
default spins for a long time first (``GOMP_SPINCOUNT`` 300,000), which wastes the CPU when
other processes need it; ``OMP_WAIT_POLICY=PASSIVE`` sleeps at once, and then every region
pays a wake-up. Dense-mode training runs many small operations per step: on 2 idle cores
its epochs took 1.65 times as long under PASSIVE as with the default, while 10,000 spins
were as fast as the default; on a machine loaded with four busy loops they took 1.3 times
PASSIVE's time, while the default had not finished after about 3 minutes where PASSIVE took
67 s (``python -m benchmarks.omp_wait``; docs/performance.md, "OpenMP wait policy").

libgomp reads these variables once, when torch is first imported, so ``apply`` runs on
``import hm4sr_core`` (before torch if nothing imported torch earlier) and child processes
inherit the setting. A choice of the user's (either variable set) is left as it is;
``make test``, which runs many processes at once, sets PASSIVE.
"""

from __future__ import annotations

import os

SPIN_COUNT = "10000"
VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def defaults(env=None) -> dict[str, str]:
    """The variables to add to ``env`` (default ``os.environ``): ``GOMP_SPINCOUNT`` unless
    ``env`` already sets a wait policy or a spin count."""
    env = os.environ if env is None else env
    if any(name in env for name in VARIABLES):
        return {}
    return {"GOMP_SPINCOUNT": SPIN_COUNT}


def apply() -> None:
    """Add ``defaults()`` to this process's environment (and so to its children's)."""
    os.environ.update(defaults())


def settings(env=None) -> dict[str, str | None]:
    """The two variables as ``env`` has them (None where unset), for result records."""
    env = os.environ if env is None else env
    return {name: env.get(name) for name in VARIABLES}
