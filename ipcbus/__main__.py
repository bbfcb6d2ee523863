"""``python -m ipcbus``: the command line (see :mod:`ipcbus._cli`, or ``ipcbus --help``)."""
from __future__ import annotations

import sys

from ._cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
