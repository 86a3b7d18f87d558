"""Hyperparameter search with Hydra's Optuna sweeper: the objective a job returns, and a
Hydra callback that tags the best trial's MLflow run when the sweep ends.

    python -m fedslm.simulations.run -m search=lr_rank_steps            # conf/search/
    python -m fedslm.simulations.run -m search=lr_rank_steps hydra.sweeper.n_trials=40

Every trial is an ordinary job: its own Flower run and its own MLflow run in
``tracking.experiment``. The objective is the task's headline metric (``Task.headline``:
perplexity for causal_lm and instruct, macro-F1 for classify) after the last round, on the
server's central held-out split (on the clients' own test splits if central evaluation is
off); the sweeper's ``direction`` must agree with ``Task.higher_is_better``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fedslm.config import ConfigError
from fedslm.tasks import get_task

BEST_TAG = "fedslm.best_trial"
OBJECTIVE_TAG = "fedslm.objective"


def objective(summary: dict, task_name: str) -> float:
    """The last round's headline metric, central if the server evaluated centrally."""
    headline = get_task(task_name).headline
    last = summary["rounds"][-1] if summary.get("rounds") else {}
    for key in (f"central_{headline}", f"eval_{headline}"):
        if key in last:
            return float(last[key])
    return math.nan


def check_direction(direction: Any, task_name: str) -> None:
    """A sweep that maximises perplexity (or minimises macro-F1) would search backwards."""
    want = "maximize" if get_task(task_name).higher_is_better else "minimize"
    got = getattr(direction, "name", str(direction))
    if got != want:
        raise ConfigError(
            f"hydra.sweeper.direction: must be {want} for task.name={task_name} "
            f"(its objective is {get_task(task_name).headline}), got {got}"
        )


class BestTrialTagger(Callback):
    """Tags every trial's MLflow run with its objective and the best one with
    ``fedslm.best_trial=true`` (``hydra.callbacks`` in ``conf/search/*.yaml``)."""

    def __init__(self) -> None:
        self.trials: list[tuple[float, str, str]] = []  # (objective, mlflow uri, run id)
        self.maximize = False

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.COMPLETED or job_return.return_value is None:
            return
        summary_file = Path(str(config.output_dir)) / "summary.json"
        if not summary_file.exists():
            return
        summary = json.loads(summary_file.read_text())
        value = float(job_return.return_value)
        self.maximize = get_task(str(config.task.name)).higher_is_better
        if summary.get("mlflow_uri") and not math.isnan(value):
            self.trials.append((value, summary["mlflow_uri"], summary["mlflow_run_id"]))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.trials:
            return
        import mlflow

        best = (max if self.maximize else min)(self.trials, key=lambda t: t[0])
        for value, uri, run_id in self.trials:
            client = mlflow.MlflowClient(tracking_uri=uri)
            client.set_tag(run_id, OBJECTIVE_TAG, f"{value:.6g}")
            client.set_tag(run_id, BEST_TAG, str((value, uri, run_id) == best).lower())
        print(f"[fedslm] best trial: MLflow run {best[2]} ({OBJECTIVE_TAG}={best[0]:.6g})", flush=True)
