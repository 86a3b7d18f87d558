"""The one rule for where a run's files live, shared by the ServerApp and the ClientApp."""

from __future__ import annotations

from pathlib import Path


def output_dir_for(configured: str, run_id: int) -> Path:
    """The configured absolute output dir, or one per Flower run under ~/.cache/fedslm.

    Clients keep per-partition state (e.g. compression residuals) under it too.
    """
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "fedslm" / "runs" / str(run_id)
