"""``python -m hm4sr_core ARGS`` and the ``hm4sr`` console script: the command line, with the
process settings applied before torch is imported (hm4sr_core.runtime).

``torchrun ... -m hm4sr_core train ARGS`` runs ``hm4sr train ARGS`` on every rank."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from . import runtime
    runtime.configure_process()  # first: libgomp reads its variables when torch is loaded
    from .cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
