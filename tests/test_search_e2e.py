"""Hyperparameter search with Hydra's Optuna sweeper (2 trials at tiny settings)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.proc_util import run_cli, survivors
from tests.stores import sqlite_store


@pytest.mark.e2e
def test_optuna_sweep_returns_the_objective_and_tags_the_best_trial(tmp_path: Path) -> None:
    sweep, db = tmp_path / "sweep", tmp_path / "mlflow.db"
    proc, marker = run_cli(
        [
            "-m",
            "search=lr_rank_steps",
            "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={sweep}",
            "training.local_steps=choice(1, 2)",
            "federation.num_clients=2",
            "federation.num_rounds=1",
            "federation.initial_evaluation=false",
            "data.docs_per_client=16",
            f"tracking.uri={sqlite_store(db)}",
            "tracking.experiment=search",
        ],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    objectives = {}
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        objectives[summary["mlflow_run_id"]] = summary["rounds"][-1]["central_perplexity"]
    best_value = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"]
    assert math.isclose(best_value, min(objectives.values()))

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("search").experiment_id])
    assert {r.info.run_id for r in runs} == set(objectives)
    best = [r.info.run_id for r in runs if r.data.tags.get("fedslm.best_trial") == "true"]
    assert best == [min(objectives, key=objectives.get)]
    for r in runs:
        assert math.isclose(float(r.data.tags["fedslm.objective"]), objectives[r.info.run_id], rel_tol=1e-5)
    assert f"[fedslm] best trial: MLflow run {best[0]}" in proc.stdout
    assert survivors(marker) == []


def test_sweeping_the_wrong_way_is_refused() -> None:
    from fedslm.config import ConfigError
    from fedslm.simulations.search import check_direction

    check_direction("minimize", "causal_lm")
    check_direction("maximize", "classify")
    with pytest.raises(ConfigError, match=r"^hydra\.sweeper\.direction: must be maximize for task\.name=classify"):
        check_direction("minimize", "classify")


def test_objective_is_the_last_rounds_central_headline() -> None:
    from fedslm.simulations.search import objective

    rounds = [{"round": 1, "central_perplexity": 9.0}, {"round": 2, "central_perplexity": 8.5, "eval_perplexity": 8.0}]
    assert objective({"rounds": rounds}, "causal_lm") == 8.5
    assert objective({"rounds": [{"eval_macro_f1": 0.4}]}, "classify") == 0.4
    assert math.isnan(objective({"rounds": []}, "causal_lm"))
