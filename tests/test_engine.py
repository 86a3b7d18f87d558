"""``fedslm engine up|down|status`` and ``federation.superlink``: runs on a local engine
that outlives them. The suite's engine tests all run on one (conftest's ``SharedEngine``,
started with ``fedslm engine up``); here: the config checks, the CLI's answers, and that a
run whose launcher dies is stopped on the engine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import mlflow
import pytest

from fedslm.config import ConfigError, ExperimentConfig
from fedslm.simulations.launch import check_superlink
from tests.hydra_util import compose_experiment
from tests.proc_util import REPO, LiveLauncher, run_cli, survivors
from tests.stores import sqlite_store


def _federation(**federation) -> ExperimentConfig:
    return ExperimentConfig.from_dict({"federation": federation})


def test_a_run_names_a_local_engine_by_its_loopback_address() -> None:
    assert _federation(superlink="127.0.0.1:9092").federation.superlink == "127.0.0.1:9092"
    assert _federation(superlink="[::1]:9092").federation.superlink == "[::1]:9092"
    for bad in ("10.0.0.5:9092", "superlink.lan:9092", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:http"):
        with pytest.raises(ConfigError) as err:
            _federation(superlink=bad)
        assert str(err.value) == (
            "federation.superlink: expected 127.0.0.1:PORT of a local engine "
            f"(`fedslm engine up` prints it), got {bad!r}"
        )


@pytest.mark.parametrize(
    ("federation", "expected"),
    [
        (
            {"engine": "remote", "address": "127.0.0.1:9093", "insecure": True},
            "federation.superlink: only applies to federation.engine=simulation (a deployment's SuperLink is "
            "federation.address)",
        ),
        (
            {"ray_address": "127.0.0.1:6379"},
            "federation.ray_address: cannot be set with federation.superlink=127.0.0.1:9092: that engine's Ray "
            "was chosen when it started (`fedslm engine up`)",
        ),
        (
            {"ray_cpus": 1},
            "federation.ray_cpus: must be 0 with federation.superlink=127.0.0.1:9092: that engine's Ray size "
            "was fixed when it started (`fedslm engine up --ray-cpus`)",
        ),
    ],
)
def test_options_a_running_engine_already_decided_are_refused_naming_both_keys(federation, expected) -> None:
    with pytest.raises(ConfigError) as err:
        _federation(superlink="127.0.0.1:9092", **federation)
    assert str(err.value) == expected


def test_the_hydra_default_is_the_environments_engine(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDSLM_SUPERLINK", "127.0.0.1:9092")
    monkeypatch.setenv("FEDSLM_RAY_CPUS", "0")
    assert compose_experiment([], tmp_path).federation.superlink == "127.0.0.1:9092"
    assert compose_experiment(["federation.superlink="], tmp_path).federation.superlink == ""
    # a deployment run ignores it (federation=remote has no such default)
    remote = compose_experiment(
        ["federation=remote", "federation.insecure=true", "federation.root_certificates="], tmp_path
    )
    assert remote.federation.superlink == ""


def test_an_engine_that_does_not_answer_fails_before_anything_starts() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: refuses connections
        with pytest.raises(ConfigError) as err:
            check_superlink(_federation(superlink=f"127.0.0.1:{port}"))
    assert str(err.value).startswith(
        f"federation.superlink: no local engine answers at 127.0.0.1:{port} (ConnectError: "
    )
    assert str(err.value).endswith("); start one with `fedslm engine up`, or leave it empty for a SuperLink per run")
    assert "\n" not in str(err.value)
    check_superlink(_federation())  # none named: nothing to check


def _engine_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedslm.simulations.cli", "engine", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_status_and_down_without_an_engine_and_a_stale_state_file(tmp_path) -> None:
    state = tmp_path / "engine.json"
    out = _engine_cli("status", "--state", str(state))
    assert (out.returncode, out.stdout) == (1, "[fedslm] no local engine is up\n")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state.write_text(json.dumps({"pid": dead.pid, "superlink": "127.0.0.1:1"}))  # a killed engine's file
    assert _engine_cli("status", "--state", str(state)).returncode == 1
    out = _engine_cli("down", "--state", str(state))
    assert (out.returncode, out.stdout) == (0, "[fedslm] no local engine is up\n")
    assert not state.exists()
    out = _engine_cli("up", "--ray-cpus", "-1", "--state", str(state))
    assert (out.returncode, out.stderr) == (2, "error: --ray-cpus: must be >= 0 (0: every core), got -1\n")


@pytest.mark.e2e
def test_up_finds_the_running_engine_and_a_killed_launchers_run_is_stopped_on_it(tmp_path: Path) -> None:
    """On the worker's engine (``fedslm engine up`` by conftest): ``up`` again reports it,
    ``status`` finds it healthy; a run whose launcher is SIGTERMed mid-run is stopped there
    (its ServerApp ends, ``status.json`` and the MLflow run say killed), the engine lives on."""
    from fedslm.simulations.engine import STATE_ENV

    state = os.environ[STATE_ENV]
    address = os.environ["FEDSLM_SUPERLINK"]
    again = _engine_cli("up", "--state", state)
    assert again.returncode == 0 and again.stdout.endswith(f"export FEDSLM_SUPERLINK={address}\n")
    assert "already up" in again.stdout
    assert _engine_cli("status", "--state", state).returncode == 0

    uri = sqlite_store(tmp_path / "mlflow.db")
    marker = uuid.uuid4().hex
    live = LiveLauncher(
        [
            "federation.num_clients=2",
            "federation.num_rounds=1000",
            "training.local_steps=5",
            "data.docs_per_client=16",
            "verbose=true",
            f"tracking.uri={uri}",
            "tracking.experiment=engine-kill",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        marker,
    )
    try:
        live.wait_for("[round 1/1000] train:")
    finally:
        live.process.send_signal(signal.SIGTERM)
        live.process.wait(timeout=120)
    assert survivors(marker, wait=30) == []  # the launcher's processes and the run's ServerApp
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "killed"
    client = mlflow.MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("engine-kill").experiment_id])
    assert run.info.status == "KILLED"
    assert _engine_cli("status", "--state", state).returncode == 0  # the engine itself lives on


@pytest.mark.e2e
def test_a_run_on_a_running_ray_joins_it_and_leaves_it_up(tmp_path: Path) -> None:
    """``federation.ray_address`` (docs/deployment.md): the run's simulation process joins
    that Ray as one more driver instead of starting a Ray, and the Ray, the user's, is still
    up after the run. (The suite's other engine tests run on their worker's engine.)"""
    from fedslm.simulations.ray_head import ray_head

    home = Path(tempfile.mkdtemp(prefix="fedslm-test-ray-"))  # short: Ray's socket paths
    try:
        with ray_head(home, num_cpus=1) as head:
            proc, marker = run_cli(
                [
                    "federation.num_clients=2",
                    "federation.num_rounds=1",
                    "training.local_steps=1",
                    "data.docs_per_client=16",
                    "tracking.enabled=false",
                    "federation.superlink=",
                    f"federation.ray_address={head['RAY_ADDRESS']}",
                ],
                env={key: head[key] for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")},
            )
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            drivers = {p.name.split("_")[0] for p in (home / "ray").glob("session_*/logs/python-core-driver-*")}
            assert len(drivers) == 2  # the Ray's owner, then the run's simulation process
            assert survivors(marker) == []
            host, _, port = head["RAY_ADDRESS"].rpartition(":")
            socket.create_connection((host, int(port)), timeout=3).close()  # still up
    finally:
        shutil.rmtree(home, ignore_errors=True)
