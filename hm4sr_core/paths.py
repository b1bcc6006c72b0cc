"""Where the workbench keeps its files: the data root and the runs root.

The data root holds ``processed/<name>/`` (prepared datasets), ``cache/`` (encoder
features, input digests) and ``raw/`` (downloaded source files). It is ``$HM4SR_DATA``
when set, else ``data/`` in the current working folder: in a clone that is the clone's
``data/`` (``make`` runs there), in an installed package it is wherever the user works,
never inside site-packages. Run folders default to ``$HM4SR_RUNS``, else ``runs/`` in the
working folder. ``hm4sr --data-root DIR`` sets ``HM4SR_DATA`` for one command (and the
notebook kernels it starts).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "HM4SR_DATA"
RUNS_ENV = "HM4SR_RUNS"


def data_root() -> Path:
    """``$HM4SR_DATA``, else ``./data``, as an absolute path (read at each call)."""
    value = os.environ.get(DATA_ENV)
    return (Path(value).expanduser() if value else Path("data")).absolute()


def processed_root() -> Path:
    """Prepared datasets: ``<data root>/processed``."""
    return data_root() / "processed"


def runs_root() -> Path:
    """Default parent of run folders: ``$HM4SR_RUNS``, else ``./runs``."""
    value = os.environ.get(RUNS_ENV)
    return (Path(value).expanduser() if value else Path("runs")).absolute()
