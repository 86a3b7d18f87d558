"""`flwr run .` from the project root, as a Flower user would type it, does what the
app's config says: Flower 1.41's local simulation starts 2 SuperNodes whatever the app
asks for, and the ServerApp serves every configured client from them."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import uuid
from pathlib import Path

import psutil
import pytest

from fedslm.flower_tools import flower_bin, flower_env
from tests.proc_util import MARKER, REPO, survivors


def _stop(marker: str) -> None:
    """Flower's managed local SuperLink outlives `flwr run`: stop what this test started."""
    for line in survivors(marker, wait=0):
        pid = int(line.split(":", 1)[0])
        try:
            os.killpg(pid, signal.SIGTERM) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    for line in survivors(marker, wait=10):
        try:
            psutil.Process(int(line.split(":", 1)[0])).kill()
        except psutil.NoSuchProcess:
            continue


@pytest.mark.e2e
def test_flwr_run_dot_trains_every_configured_client(tmp_path: Path) -> None:
    out, marker = tmp_path / "out", uuid.uuid4().hex
    env = flower_env(
        {
            "FLWR_HOME": str(tmp_path / "flwr-home"),
            MARKER: marker,
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
        }
    )
    run_config = (
        f'output_dir="{out}" federation.num_clients=5 federation.num_rounds=1 '
        "training.local_steps=1 training.central_eval=false "
        "federation.initial_evaluation=false tracking.enabled=false"
    )
    try:
        proc = subprocess.run(
            [flower_bin("flwr"), "run", ".", "--stream", "--run-config", run_config],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        _stop(marker)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "[fedslm] federation.num_clients=5 on 2 simulated SuperNodes: serving all 5 clients" in log, log[-3000:]
    assert f"[fedslm] outputs: {out}" in log
    with open(out / "clients.csv") as fh:
        trained = {
            r["partition-id"]
            for r in csv.DictReader(fh)
            if r["phase"] == "train" and r["round"] == "1" and r.get("status", "ok") in ("", "ok")
        }
    assert trained == {"0", "1", "2", "3", "4"}
