"""The jobs of a `-m` sweep share one SuperLink and one Ray, and nothing outlives the sweep."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest

from tests.proc_util import run_cli, survivors
from tests.stores import sqlite_store

TINY = [
    "federation.num_clients=2",
    "federation.num_rounds=1",
    "training.local_steps=1",
    "federation.initial_evaluation=false",
    "data.docs_per_client=16",
]


@pytest.mark.e2e
def test_a_sweep_runs_every_job_on_one_superlink(tmp_path: Path) -> None:
    sweep, db = tmp_path / "sweep", tmp_path / "mlflow.db"
    proc, marker = run_cli(
        [
            "-m",
            "peft.r=2,4,8",
            f"hydra.sweep.dir={sweep}",
            *TINY,
            f"tracking.uri={sqlite_store(db)}",
            "tracking.experiment=warm",
            # the sweep's own SuperLink and Ray (not the suite's shared engine): its Flower
            # runs and Ray jobs are counted below
            "federation.superlink=",
            "federation.ray_address=",
            "federation.ray_cpus=1",
        ],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = [json.loads((sweep / str(j) / "summary.json").read_text()) for j in range(3)]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("warm").experiment_id])
    assert {r.info.run_id for r in runs} == {s["mlflow_run_id"] for s in summaries}
    assert sorted(r.data.params["peft.r"] for r in runs) == ["2", "4", "8"]
    assert all(r.info.status == "FINISHED" for r in runs)
    # the last job's copy of the SuperLink log holds all three Flower runs: one SuperLink
    created = re.findall(r"Created run (\d+)", (sweep / "2" / "superlink.log").read_text())
    assert len(created) == 3
    # and one Ray: every job's simulation process connected to the sweep's instance (its
    # first Ray job is the instance's owner, then one per run) instead of starting its own
    engines = [json.loads((sweep / str(j) / "engine.json").read_text()) for j in range(3)]
    assert len({(e["superlink"], e["ray"]) for e in engines}) == 1 and engines[0]["ray"]
    assert [len(e["ray_jobs"]) for e in engines] == [2, 3, 4]
    assert survivors(marker) == []


@pytest.mark.e2e
def test_nothing_outlives_a_sweep_whose_second_job_fails(tmp_path: Path) -> None:
    proc, marker = run_cli(
        [
            "-m",
            "training.seq_len=32,4096,32",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            *TINY,
            "tracking.enabled=false",
            # the sweep's own engine, which must not outlive it (one Ray worker, as elsewhere)
            "federation.superlink=",
            "federation.ray_cpus=1",
        ],
        timeout=600,
    )
    assert proc.returncode == 2
    assert "error: training.seq_len: 4096 exceeds" in proc.stderr
    assert (tmp_path / "sweep" / "0" / "summary.json").exists()  # the first job ran
    assert survivors(marker) == []
