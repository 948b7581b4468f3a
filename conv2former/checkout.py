"""The one place a script puts its checkout on ``sys.path``.

The wheel is the library alone (``conv2former``); the stages' packages (``data_prep``, ``launch``) and the benchmarks
run from a checkout. A script that imports one of them calls ``checkout_first(__file__)`` first; the training
launchers import only the library and need nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path


def checkout_first(script: str) -> Path:
    """Put the checkout holding ``script`` (a file one folder below its root, such as data_prep/shard.py) first on
    ``sys.path``; returns the checkout's root."""
    root = Path(script).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root
