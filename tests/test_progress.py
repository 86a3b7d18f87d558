"""The run's one progress display: what it prints above the bar, what it drops."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest

from fedslm.quiet import quiet_process
from fedslm.runconfig import PROJECT_ROOT
from fedslm.simulations.progress import RunProgress

STREAM = [
    "Using SuperLink: fedslm (127.0.0.1:57241)\n",
    "Successfully started run 6658685726128327572\n",
    "\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `6658685726128327572`\n",
    "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.\n",
    "\x1b[92mINFO \x1b[0m:      Federation `@none/default` (10 simulated SuperNodes)\n",
    "Loading weights: 100%|██████████| 20/20 [00:00<00:00, 20929.66it/s]\n",
    "  sqlalchemy.orm.configure_mappers()\n",
    "\x1b[92mINFO \x1b[0m:      [fedslm] outputs: /tmp/run\n",
    "\x1b[92mINFO \x1b[0m:      configure_train: Sampled 10 nodes (out of 10)\n",
    "\x1b[92mINFO \x1b[0m:      [round 1/2] train: 7/10 clients done\n",
    "\x1b[93mWARNING \x1b[0m:   [round 1/2] train: rejected update from node 3: non-finite values\n",
    "\x1b[92mINFO \x1b[0m:      [round 1/2] | train loss 2.0545 | ppl 8.50 | 8.1s\n",
    "(ClientAppActor pid=31080) \x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor\n",
    "(ClientAppActor pid=31081) \x1b[93mWARNING \x1b[0m:   [fedslm] client 4: 3 of 16 documents skipped\n",
    "\x1b[91mERROR \x1b[0m:     ServerApp thread raised an exception\n",
    "Traceback (most recent call last):\n",
]


def test_only_what_speaks_to_the_user_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    progress = RunProgress(2, out=out)
    for line in STREAM:
        progress.feed(line)
    assert progress.bar is not None and progress.bar.n == 1
    assert progress.metrics == "train loss 2.0545 | ppl 8.50 | 8.1s"
    progress.close()
    assert out.getvalue().splitlines() == [
        "[fedslm] outputs: /tmp/run",
        "WARNING: [round 1/2] train: rejected update from node 3: non-finite values",
        "WARNING: [fedslm] client 4: 3 of 16 documents skipped",
        "ERROR: ServerApp thread raised an exception",
        "Traceback (most recent call last):",
    ]
    assert "round 1/2 done" in capsys.readouterr().err  # the bar, on stderr


def test_verbose_prints_every_line_and_no_bar() -> None:
    out = io.StringIO()
    progress = RunProgress(2, verbose=True, out=out)
    for line in STREAM:
        progress.feed(line)
    progress.close()
    assert out.getvalue() == "".join(STREAM)
    assert progress.bar is None


def test_quiet_process_drops_flowers_routine_lines_not_its_warnings(caplog: pytest.LogCaptureFixture) -> None:
    quiet_process(verbose=False)
    logger = logging.getLogger("flwr")
    with caplog.at_level(logging.INFO, logger="flwr"):
        logger.info("configure_train: Sampled %d nodes (out of %d)", 10, 10)
        logger.info("[round 1/5] train: 1/10 clients done")
        logger.warning("aggregate_train: something odd")
    assert [r.getMessage() for r in caplog.records] == [
        "[round 1/5] train: 1/10 clients done",
        "aggregate_train: something odd",
    ]


def test_a_new_mlflow_store_says_nothing_in_a_quiet_process(tmp_path) -> None:
    """MLflow logs "Creating initial MLflow database tables..." at INFO for every new
    store: a user's first run would print it (run in a fresh process: quiet mode before
    and after mlflow is imported, as the ServerApp may meet either)."""
    code = (
        "import sys; from fedslm.quiet import quiet_process\n"
        "if sys.argv[1] == 'after': import mlflow\n"
        "quiet_process(verbose=False)\n"
        "import mlflow; mlflow.set_tracking_uri(sys.argv[2]); mlflow.set_experiment('q')\n"
        "print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_LOGGING_LEVEL"}
    for when in ("before", "after"):
        uri = f"sqlite:///{tmp_path}/{when}.db"
        out = subprocess.run(
            [sys.executable, "-c", code, when, uri], capture_output=True, text=True, env=env, cwd=PROJECT_ROOT
        )
        assert out.returncode == 0 and out.stdout == "ok\n", out.stderr[-2000:]
        assert out.stderr == "", out.stderr
        assert (tmp_path / f"{when}.db").exists()


def test_engine_processes_start_quiet_unless_verbose(tmp_path) -> None:
    from fedslm.simulations.launch import engine_env

    quiet, loud = engine_env(tmp_path), engine_env(tmp_path, verbose=True)
    assert quiet["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and quiet["PYTHONWARNINGS"] == "ignore"
    assert quiet["MLFLOW_LOGGING_LEVEL"] == "WARNING"
    assert loud.get("MLFLOW_LOGGING_LEVEL") == os.environ.get("MLFLOW_LOGGING_LEVEL")
    assert loud.get("PYTHONWARNINGS") == os.environ.get("PYTHONWARNINGS")  # the user's own
    assert loud.get("HF_HUB_DISABLE_PROGRESS_BARS") == os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    key = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"
    assert quiet[key] == loud[key] == "1"


def test_the_local_superexec_looks_for_runs_four_times_a_second_unless_the_user_says(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedslm.simulations.launch import engine_env

    monkeypatch.delenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", raising=False)
    assert engine_env(tmp_path)["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.25"  # Flower's default: 1 s
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "2")
    assert engine_env(tmp_path, verbose=True)["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "2"
