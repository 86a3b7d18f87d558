"""The one rule for where a run's files live, shared by the ServerApp and the ClientApp."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedslm.config import ExperimentConfig

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


def resolve_state_dir(cfg: ExperimentConfig, *, run_id: int = 0) -> Path:
    """Base dir of simulated clients' state (each client: ``<base>/<partition id>``).

    ``personalization.state_dir`` if set, else ``<output_dir>/clients`` (``output_dir``
    "" means the ServerApp's default ``~/.cache/fedslm/runs/<run_id>``). A device uses
    its agent's ``state-dir`` instead (``fedslm.client.node``).
    """
    return clients_dir_of_run(cfg, output_dir_for(cfg.output_dir, run_id))


def clients_dir_of_run(cfg: ExperimentConfig, output_dir: Path) -> Path:
    """``resolve_state_dir`` for a run whose output dir is known (the audit reads the
    simulated clients' personal adapters from it after the run)."""
    if cfg.personalization.state_dir:
        return Path(cfg.personalization.state_dir).expanduser()
    return Path(output_dir) / "clients"
