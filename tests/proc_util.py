"""Run the real CLI in a subprocess and prove it left no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MARKER = "FEDSLM_TEST_MARKER"
RUNS_ENV = "FEDSLM_TEST_RUNS"  # set by conftest: run dirs live under pytest's own tmp (cleaned)
ENGINE_MARK_ENV = "FEDSLM_TEST_ENGINE_MARK"  # the worker's shared engine's run mark (conftest)
RUN_MARK_ENV = "FEDSLM_RUN_MARK"  # fedslm.simulations.watchdog.MARK_ENV


def run_cli(args: list[str], *, timeout: float = 300, env: dict | None = None
            ) -> tuple[subprocess.CompletedProcess, str]:
    """``python -m fedslm.simulations.run ARGS`` tagged with a unique marker in its environment;
    every process it spawns (SuperLink, ServerApp, Ray) inherits the marker."""
    marker = uuid.uuid4().hex
    if not any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in args):
        run_dir = tempfile.mkdtemp(prefix="fedslm-cli-", dir=os.environ.get(RUNS_ENV))  # not ./outputs
        args = [*args, f"hydra.run.dir={run_dir}"]
    full_env = {**os.environ, MARKER: marker, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "fedslm.simulations.run", *args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc, marker


class LiveLauncher:
    """``python -m fedslm.simulations.run ARGS`` running in its own session, its output
    collected line by line (``lines``) for a test to act on mid-run (signal it, inspect
    its processes), tagged with ``marker`` as ``run_cli``'s runs are."""

    def __init__(self, args: list[str], marker: str) -> None:
        env = {**os.environ, MARKER: marker, "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen([sys.executable, "-m", "fedslm.simulations.run", *args], cwd=REPO, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout or []), daemon=True).start()

    def wait_for(self, needle: str, timeout: float = 240) -> None:
        """Until a line holds ``needle``; fails with the output's tail if the launcher ends
        or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while not any(needle in line for line in self.lines):
            assert self.process.poll() is None and time.monotonic() < deadline, "".join(self.lines)[-3000:]
            time.sleep(0.5)


def _alive(marker: str | None) -> list[str]:
    """Live processes carrying ``marker``, and the ServerApp processes (``flwr-simulation``)
    the worker's shared engine (conftest's ``SharedEngine``) still runs: the engine outlives
    a test, its runs must not."""
    engine_mark = os.environ.get(ENGINE_MARK_ENV)
    alive = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            env = p.environ()
            cmdline = " ".join(p.info["cmdline"] or [])
            if (marker and env.get(MARKER) == marker) or (
                    engine_mark and env.get(RUN_MARK_ENV) == engine_mark and "flwr-simulation" in cmdline):
                alive.append(f"{p.pid}: {cmdline[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return alive


def survivors(marker: str | None, wait: float = 15.0) -> list[str]:
    """``_alive(marker)`` after up to ``wait`` s for them to exit (``marker`` None: the
    shared engine's runs only, for an in-process run)."""
    deadline = time.monotonic() + wait
    while (alive := _alive(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive


def on_test_ray(federation: dict) -> dict:
    """A ``federation`` config section for an in-process engine run (``ExperimentConfig.
    from_dict``, which reads no Hydra default): on the worker's shared engine when an
    engine test has one (conftest's ``engine_tests_share_one_engine``), as the CLI runs are."""
    return {"superlink": os.environ.get("FEDSLM_SUPERLINK", ""), **federation}
