"""A quiet terminal: other libraries' warnings and progress bars silenced where they
start, in every process of a run (launcher, ServerApp, ClientApps), unless ``verbose``.

What is silenced means nothing to a FedSLM user: Python warnings (deprecations in
SQLAlchemy, Opacus, transformers), transformers' "Loading weights" bar per worker and
round, MLflow's INFO lines (a new store's "Creating initial MLflow database tables..."),
Flower's routine per-round INFO lines (``configure_train: Sampled ...``,
``aggregate_train: Received ...``, which the progress display shows better) and httpx's
per-request lines. Log records at WARNING and above from Flower, and every error, still
come through.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# For the processes the launcher starts (read at their start, before any import).
QUIET_ENV = {
    "PYTHONWARNINGS": "ignore",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables..." and the like
    "RAY_DEDUP_LOGS": "0",
}
FLOWER_ROUTINE = ("configure_train:", "configure_evaluate:", "aggregate_train:", "aggregate_evaluate:")


class _FlowerRoutine(logging.Filter):
    """Drops Flower's routine INFO lines; keeps warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not str(record.msg).startswith(FLOWER_ROUTINE)


_FILTER = _FlowerRoutine()


def quiet_process(verbose: bool) -> None:
    """Silence third-party noise in this process (idempotent); nothing when ``verbose``."""
    if verbose:
        return
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if "mlflow" in sys.modules:  # imported already: its own logger config is set
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    flwr_logger = logging.getLogger("flwr")
    if _FILTER not in flwr_logger.filters:
        flwr_logger.addFilter(_FILTER)
    if "huggingface_hub.utils" in sys.modules:
        sys.modules["huggingface_hub.utils"].disable_progress_bars()
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None and hasattr(hf_logging, "disable_progress_bar"):
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
