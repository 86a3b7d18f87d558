"""A real run registers its best round in a real ``mlflow server`` on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from fedslm.config import ExperimentConfig
from fedslm.simulations.run import run
from tests.proc_util import on_test_ray
from tests.stores import sqlite_store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", sqlite_store(tmp_path / "srv.db"),
         "--artifacts-destination", str(tmp_path / "srv-artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        # MLflow 3's server also starts a job runner with seven huey consumers (GenAI jobs,
        # trace rollups), each importing mlflow: ~20 CPU-s for nothing a FedSLM run uses
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    try:
        yield uri
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.e2e
def test_run_registers_its_best_round_in_an_mlflow_server(tmp_path, mlflow_server):
    import mlflow

    cfg = ExperimentConfig.from_dict({
        "federation": on_test_ray({"num_clients": 3, "num_rounds": 3}),
        "data": {"docs_per_client": 24},
        "training": {"local_steps": 3, "learning_rate": 0.2},
        "tracking": {"uri": mlflow_server, "experiment": "e2e-registry", "register": True,
                     "model_name": "fedslm-e2e", "register_best_by": "central_loss"},
        "output_dir": str(tmp_path / "run"),
    })
    summary = run(cfg)
    losses = {r["round"]: r["central_loss"] for r in summary["rounds"] if r["round"] >= 1}
    best = min(losses, key=losses.get)
    assert summary["registered"]["round"] == best
    assert best != max(losses)  # this run's best round is not its last
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    version = client.get_model_version("fedslm-e2e", str(summary["registered"]["version"]))
    assert version.tags["fedslm.round"] == str(best)
    assert float(version.tags["central_loss"]) == pytest.approx(losses[max(losses)], rel=1e-5)
    mlflow.set_tracking_uri(mlflow_server)
    try:
        model = mlflow.pyfunc.load_model(f"models:/fedslm-e2e/{version.version}")
    finally:
        mlflow.set_tracking_uri("")
    [text] = model.predict(["the river"], params={"max_new_tokens": 5})
    assert isinstance(text, str) and text
