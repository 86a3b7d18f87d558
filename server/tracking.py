"""MLflow tracking: the server is the only writer.

One run per experiment (an MLflow experiment groups a sweep), params = the flat run
config, metrics per round with ``step=server_round``, artifacts = the resolved config,
per-round/per-client tables, plots and the final adapter. An explicit ``MlflowClient``
is used instead of MLflow's global state, so nothing depends on the working directory
or environment of the process Flower starts the ServerApp in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedslm.config import TrackingConfig

MAX_PARAMS_PER_CALL = 100


def default_artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside the database, as an absolute path."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


class Tracker:
    """Writes one MLflow run; ``run_id`` may name an existing run to continue it."""

    def __init__(self, cfg: TrackingConfig, *, default_uri: str) -> None:
        import mlflow  # heavy; only the server process pays for it

        self.uri = cfg.uri or default_uri
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        self.cfg = cfg
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    def start(self, params: Mapping[str, Any], *, run_id: str | None = None,
              tags: Mapping[str, str] | None = None, default_name: str = "") -> str:
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is None:
            self.experiment_id = self.client.create_experiment(
                self.cfg.experiment, artifact_location=default_artifact_root(self.uri)
            )
        else:
            self.experiment_id = exp.experiment_id
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id
        run = self.client.create_run(
            self.experiment_id, run_name=self.cfg.run_name or default_name or None,
            tags=dict(tags or {})
        )
        self.run_id = run.info.run_id
        self._log_params(params)
        return self.run_id

    def _log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS_PER_CALL])

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)


class NoTracker:
    """Stand-in when ``tracking.enabled=false``: the run still writes its output dir."""

    uri = ""
    run_id = None
    experiment_id = None

    def start(self, params: Mapping[str, Any], *, run_id: str | None = None,
              tags: Mapping[str, str] | None = None, default_name: str = "") -> str:
        return ""

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def set_tag(self, key: str, value: str) -> None: ...

    def end(self, status: str = "FINISHED") -> None: ...


def mark_killed(uri: str, experiment: str, output_dir: str) -> list[str]:
    """Set every RUNNING run of ``experiment`` that wrote to ``output_dir`` to KILLED:
    a launcher that died leaves no run claiming to be in progress. Returns their ids."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    quoted = output_dir.replace("'", "\\'")
    runs = client.search_runs([exp.experiment_id], filter_string=(
        f"attributes.status = 'RUNNING' and tags.`fedslm.output_dir` = '{quoted}'"))
    for run in runs:
        client.set_terminated(run.info.run_id, status="KILLED")
    return [run.info.run_id for run in runs]
