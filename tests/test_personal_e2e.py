"""End to end on Flower's simulation engine: dual personalization, MLflow, client state, compare."""

from __future__ import annotations

import contextlib
import csv
import json

import psutil
import pytest

from fedslm.config import ExperimentConfig
from fedslm.simulations import compare
from fedslm.simulations.run import run
from tests.proc_util import on_test_ray, survivors
from tests.stores import sqlite_store


def _left_over() -> list[str]:
    """This process's live descendants (the run's watchdog, a SuperLink of its own) and,
    after up to 15 s to exit, the ServerApp the worker's shared engine ran it in."""
    mine = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # gone, or a zombie its parent has yet to reap
            if p.status() != psutil.STATUS_ZOMBIE:
                mine.append(f"{p.pid}: {' '.join(p.cmdline())[:120]}")
    return mine + survivors(None)


@pytest.mark.e2e
def test_dual_run_reports_personal_vs_global_per_round(tmp_path, capsys):
    import mlflow

    uri = sqlite_store(tmp_path / "mlflow.db")
    cfg = ExperimentConfig.from_dict({
        "personalization": {"method": "dual"},
        "federation": on_test_ray({"num_clients": 3, "num_rounds": 2}),
        "data": {"heterogeneity": 1.0, "docs_per_client": 24},
        "tracking": {"uri": uri, "experiment": "e2e-personal"},
        "output_dir": str(tmp_path / "run"),
    })
    summary = run(cfg)
    assert _left_over() == []  # watchdog, ServerApp, the run's Ray job: all gone

    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = summary["mlflow_run_id"]
    history = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
               for key in ("global_perplexity_mean", "personal_perplexity_mean", "personal_clients",
                           "gain_p10", "gain_p90", "clients_improved_pct")}
    assert sorted(history["global_perplexity_mean"]) == [0, 1, 2]
    assert history["personal_clients"] == {0: 0.0, 1: 3.0, 2: 3.0}  # none before training
    assert sorted(history["personal_perplexity_mean"]) == [1, 2]
    assert history["gain_p10"][2] <= history["gain_p90"][2]
    artifacts = {f.path for f in client.list_artifacts(run_id, "personalization")}
    assert artifacts == {f"personalization/{n}" for n in (
        "clients_round_000.csv", "clients_round_001.csv", "clients_round_002.csv",
        "quality_over_rounds.png", "gain_histogram.png")}

    out = tmp_path / "run"
    with open(out / "personalization" / "clients_round_000.csv") as fh:
        assert [r["has_personal"] for r in csv.DictReader(fh)] == ["0", "0", "0"]
    with open(out / "personalization" / "clients_round_002.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["partition-id"], r["has_personal"], r["personal_round"]) for r in rows] == [
        ("0", "1", "2"), ("1", "1", "2"), ("2", "1", "2")]
    for pid in range(3):
        meta = json.loads((out / "clients" / str(pid) / "personal" / "fedslm-personal.json").read_text())
        assert (meta["method"], meta["round"], meta["updates"]) == ("dual", 2, 2)
    assert "Personalization (dual), means over clients:" in capsys.readouterr().out

    assert compare.main(["--experiment", "e2e-personal", "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 3 and table[2].split()[0] == "dual"
    assert float(table[2].split()[2]) == pytest.approx(history["global_perplexity_mean"][2], abs=5e-4)
