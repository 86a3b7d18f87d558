"""New MLflow stores for tests, without MLflow's schema migrations each time.

A new sqlite store runs MLflow's ~50 schema migrations (~1.3 CPU-seconds, in whichever
process opens it first: the test, a ServerApp or an ``mlflow server``). ``sqlite_store``
copies one that MLflow created once in this test session's worker (conftest's
``owned_cache_dir`` names where); MLflow then finds its schema current and goes straight
on. A test about what creating a store does (``test_progress``) makes its own.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TEMPLATE_ENV = "FEDSLM_TEST_MLFLOW_TEMPLATE"


def sqlite_store(path: Path) -> str:
    """The ``sqlite:///`` URI of a new, empty MLflow store at ``path``."""
    template = Path(os.environ[TEMPLATE_ENV])
    if not template.exists():
        _make_template(template)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


def _make_template(template: Path) -> None:
    """MLflow creates the store; what it logs meanwhile ("Creating initial MLflow database
    tables...", alembic's migrations) would land in whichever test first asked for a store,
    e.g. one that pins its command's stderr to one line."""
    import logging

    import mlflow

    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
