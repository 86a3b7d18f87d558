"""One lock for the heavy imports (torch, transformers, PEFT, Opacus) the apps defer.

``fedslm.server.app`` and ``fedslm.client.app`` load without torch (see their docstrings) and import
their heavy modules later: the ServerApp in ``main``, the ClientApp in a background
thread. In Flower's simulation process both happen at once, in two threads, and Python
raises ``_DeadlockError`` when two threads import packages with circular imports
concurrently. Taking this lock around both imports makes them one after the other; in a
Ray worker or on a device only one of them ever runs.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

_LOCK = threading.Lock()


def import_heavy(name: str) -> ModuleType:
    """``importlib.import_module(name)``, one deferred heavy import at a time."""
    with _LOCK:
        return importlib.import_module(name)
