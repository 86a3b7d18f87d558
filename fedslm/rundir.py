"""The one rule for where a run's files live, shared by the ServerApp and the ClientApp."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FEDSLM_CACHE_DIR"


def cache_root() -> Path:
    """``~/.cache/fedslm``, or ``$FEDSLM_CACHE_DIR``: the builtin model's build and the
    runs of ``flwr run .`` without an output dir. Every process of a run inherits it; the
    tests point it at a dir they own."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedslm"


def output_dir_for(configured: str, run_id: int) -> Path:
    """The configured absolute output dir, or one per Flower run under ``cache_root()``.

    Clients keep per-partition state (e.g. compression residuals) under it too.
    """
    if configured:
        return Path(configured)
    return cache_root() / "runs" / str(run_id)
