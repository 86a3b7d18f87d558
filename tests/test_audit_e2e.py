"""``privacy.audit=true`` end to end: clients train on canaries, the server audits the final
global adapter and the clients' personal adapters and logs the audit and the privacy
report to MLflow."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import pytest

from fedslm.config import ExperimentConfig
from fedslm.simulations.launch import run_on_simulation
from tests.proc_util import on_test_ray
from tests.stores import sqlite_store

pytestmark = pytest.mark.e2e


def test_dp_sgd_run_with_audit_logs_exposure_auc_and_the_report(tmp_path: Path):
    cfg = ExperimentConfig.from_dict({
        "federation": on_test_ray({"num_clients": 2, "num_rounds": 1, "round_timeout": 120.0}),
        "training": {"local_steps": 2, "eval_max_batches": 1},
        "data": {"docs_per_client": 8},
        "privacy": {"mode": "dp_sgd", "noise_multiplier": 1.0, "audit": True},
        "personalization": {"method": "split"},
        "audit": {"canaries": 1, "candidates": 63, "canary_clients": [0, 1]},
        "tracking": {"uri": sqlite_store(tmp_path / "mlflow.db"), "experiment": "audit-e2e"},
        "output_dir": str(tmp_path / "run")})
    summary = run_on_simulation(cfg)
    assert summary["status"] == "ok"
    client = mlflow.MlflowClient(tracking_uri=summary["mlflow_uri"])
    metrics = client.get_run(summary["mlflow_run_id"]).data.metrics
    assert {f"audit_exposure_rep{r}" for r in (1, 4, 16)} <= set(metrics)
    assert {"audit_mia_loss_auc", "audit_mia_calibrated_auc", "audit_eps_lower_bound"} <= set(metrics)
    assert 0.0 <= metrics["audit_mia_loss_auc"] <= 1.0
    # the server found the clients' personal adapters in their state dirs and attacked them
    assert metrics["audit_mia_personal_clients"] == 2
    assert {"audit_mia_personal_loss_auc", "audit_mia_personal_calibrated_tpr_at_1pct_fpr",
            "audit_eps_lower_bound_personal"} <= set(metrics)
    artifacts = {Path(a.path).name for a in client.list_artifacts(summary["mlflow_run_id"], "privacy")}
    assert artifacts == {"privacy_report.json", "privacy_report.md", "privacy_utility.png"}
    report = json.loads((tmp_path / "run" / "privacy_report.json").read_text())
    with open(tmp_path / "run" / "rounds.csv") as fh:
        last = list(csv.DictReader(fh))[-1]
    assert report["epsilon_sample_level"] == float(last["dp_epsilon_sample_max"])
    assert report["audit"]["audit_delta"] == float(last["dp_delta"]) == report["delta"]
    assert report["audit"]["audit_mia_members"] == 2 * 6
