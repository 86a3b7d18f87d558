"""The end-of-run lines that tell a user where the run went."""

from __future__ import annotations

from fedslm.simulations.report import where_to_look

SUMMARY = {"output_dir": "/o", "adapter_dir": "/o/adapter", "mlflow_run_id": "abc", "mlflow_experiment_id": "7"}


def test_sqlite_store_is_opened_with_mlflow_ui() -> None:
    text = where_to_look({**SUMMARY, "mlflow_uri": "sqlite:////x/mlflow.db"})
    assert text.splitlines()[-1] == "Open it with: mlflow ui --backend-store-uri sqlite:////x/mlflow.db"


def test_tracking_server_is_opened_at_its_own_address() -> None:
    text = where_to_look({**SUMMARY, "mlflow_uri": "http://10.0.0.5:5000/"})
    assert text.splitlines()[-1] == "Open it at:   http://10.0.0.5:5000/#/experiments/7/runs/abc"
    assert "mlflow ui" not in text


def test_no_tracking_no_mlflow_lines() -> None:
    assert "MLflow" not in where_to_look({**SUMMARY, "mlflow_uri": ""})
