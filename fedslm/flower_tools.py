"""Flower's command-line tools, found in this interpreter's own environment.

Flower's processes start each other by bare name (``flower-superlink`` starts
``flower-superexec``, which starts ``flwr-simulation`` / ``flwr-serverapp``;
``flower-supernode`` starts ``flwr-clientapp``). When the virtual environment is not
activated (``.venv/bin/python -m ...``, as in CI) those names are not on PATH, so every
environment handed to a Flower process puts the interpreter's bin dir first. Flower's
telemetry (an HTTPS call home from every process) is off unless the user's environment
turns it on: this platform's runs are private, and most of its machines are offline.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

BIN_DIR = Path(sys.executable).parent
TELEMETRY = "FLWR_TELEMETRY_ENABLED"


def flower_bin(name: str) -> str:
    """Absolute path of a Flower CLI next to this interpreter, else the bare name."""
    candidate = BIN_DIR / name
    return str(candidate) if candidate.exists() else name


def flower_env(*layers: Mapping[str, str]) -> dict[str, str]:
    """``os.environ`` overlaid with ``layers``, with this interpreter's bin dir leading PATH
    and Flower's telemetry off unless ``os.environ`` or a layer says otherwise."""
    env = {TELEMETRY: "0", **os.environ}
    for layer in layers:
        env.update(layer)
    env["PATH"] = os.pathsep.join(filter(None, [str(BIN_DIR), env.get("PATH", "")]))
    return env
