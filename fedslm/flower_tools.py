"""Flower's command-line tools, found in this interpreter's own environment.

Flower's processes start each other by bare name (``flower-superlink`` starts
``flower-superexec``, which starts ``flwr-simulation`` / ``flwr-serverapp``;
``flower-supernode`` starts ``flwr-clientapp``). When the virtual environment is not
activated (``.venv/bin/python -m ...``, as in CI) those names are not on PATH, so every
environment handed to a Flower process puts the interpreter's bin dir first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

BIN_DIR = Path(sys.executable).parent


def flower_bin(name: str) -> str:
    """Absolute path of a Flower CLI next to this interpreter, else the bare name."""
    candidate = BIN_DIR / name
    return str(candidate) if candidate.exists() else name


def flower_env(*layers: Mapping[str, str]) -> dict[str, str]:
    """``os.environ`` overlaid with ``layers``, with this interpreter's bin dir leading PATH."""
    env = dict(os.environ)
    for layer in layers:
        env.update(layer)
    env["PATH"] = os.pathsep.join(filter(None, [str(BIN_DIR), env.get("PATH", "")]))
    return env
