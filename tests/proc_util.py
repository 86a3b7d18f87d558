"""Run the real CLI in a subprocess and prove it left no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MARKER = "FEDSLM_TEST_MARKER"
RUNS_ENV = "FEDSLM_TEST_RUNS"  # set by conftest: run dirs live under pytest's own tmp (cleaned)


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


def survivors(marker: str, wait: float = 15.0) -> list[str]:
    """Processes still alive that carry ``marker`` (after up to ``wait`` s to exit)."""
    deadline = time.monotonic() + wait
    while True:
        alive = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.environ().get(MARKER) == marker:
                    alive.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:120]}")
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def on_test_ray(federation: dict) -> dict:
    """A ``federation`` config section for an in-process engine run (``ExperimentConfig.
    from_dict``, which reads no Hydra default): on the worker's shared Ray when an engine
    test has one (conftest's ``engine_tests_share_one_ray``), as the CLI runs are."""
    return {"ray_address": os.environ.get("FEDSLM_RAY_ADDRESS", ""), **federation}
