"""``fedslm engine up|down|status``: a local engine that outlives single runs.

A run on its own starts a private SuperLink and Ray and stops them when it ends
(``fedslm.simulations.launch``); a ``-m`` sweep shares one across its jobs
(``fedslm.simulations.warm_engine``). An experimenter who starts runs one after another
can keep the same engine up between them: ``up`` starts one (a simulation SuperLink on a
free 127.0.0.1 port and its own Ray, with a fresh token) in a detached process, and each
run given ``federation.superlink`` (or ``$FEDSLM_SUPERLINK``) submits to it instead of
starting its own. Each run is still its own Flower run, simulation process, Ray job and
MLflow run; a run whose launcher dies is stopped on the engine (``flwr stop``, by the
run's watchdog). ``down`` stops the engine and everything it started.

The engine's processes (its SuperLink, and the ServerApp and ClientApps of every run on
it) inherit the environment ``up`` was started with, quiet, not the environment of each
run's launcher. Its state (pid, addresses) is one JSON file: ``$FEDSLM_ENGINE_STATE``, else
``engine.json`` in the cache dir (``fedslm.rundir.cache_root``).

    fedslm engine up [--ray-cpus N]     # prints the address to export as FEDSLM_SUPERLINK
    fedslm engine status                # exit 0 if up, 1 if not
    fedslm engine down
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedslm.simulations.watchdog import live

STATE_ENV = "FEDSLM_ENGINE_STATE"
START_SECONDS = 120.0
STOP_SECONDS = 60.0


def state_file() -> Path:
    from fedslm.rundir import cache_root

    env = os.environ.get(STATE_ENV)
    return Path(env).expanduser() if env else cache_root() / "engine.json"


def read_state(path: Path) -> dict | None:
    """The engine recorded in ``path`` if its process still runs, else None (a stale file
    left by a killed engine is ignored)."""
    try:
        state = json.loads(path.read_text())
        pid = int(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if live(pid) else None


def healthy(address: str) -> bool:
    import httpx

    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"http://{address}/health", timeout=3.0).is_success
    return False


def serve(path: Path, ray_cpus: int) -> int:
    """The engine's own process: start the SuperLink and Ray, record them, wait for
    SIGTERM or SIGINT, stop them (their watchdog does it too if this process is killed)."""
    from fedslm.simulations.warm_engine import WarmEngine

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    engine = WarmEngine(shared_ray=True, ray_cpus=ray_cpus)
    try:
        address = engine.address(verbose=False)
        state = {
            "pid": os.getpid(),
            "superlink": address,
            "ray": engine.ray_address,
            "ray_cpus": ray_cpus,
            "home": str(engine.home),
            "mark": engine.mark,
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(state) + "\n")
        tmp.replace(path)
        while not stop.wait(1.0):
            pass
    finally:
        engine.stop()
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads(path.read_text())["pid"] == os.getpid():
                path.unlink()
    return 0


def up(path: Path, ray_cpus: int) -> int:
    current = read_state(path)
    if current is not None:
        print(f"[fedslm] a local engine is already up at {current['superlink']} (pid {current['pid']})")
        print(f"export FEDSLM_SUPERLINK={current['superlink']}")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.with_name(path.stem + ".log")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env.pop("FEDSLM_SUPERLINK", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedslm.simulations.engine",
                "serve",
                "--state",
                str(path),
                "--ray-cpus",
                str(ray_cpus),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_SECONDS
    while (state := read_state(path)) is None or state["pid"] != proc.pid:
        if proc.poll() is not None:
            print(f"error: engine: it exited with code {proc.returncode} while starting; see {log}", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            proc.terminate()
            print(f"error: engine: not up after {START_SECONDS:.0f} s; see {log}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(
        f"[fedslm] local engine up: SuperLink {state['superlink']}, Ray {state['ray']} (pid {proc.pid}; "
        f"log {log}; stop it with `fedslm engine down`)"
    )
    print(f"export FEDSLM_SUPERLINK={state['superlink']}")
    return 0


def running_or_say(path: Path) -> dict | None:
    """``read_state``, saying so when no engine is up."""
    current = read_state(path)
    if current is None:
        print("[fedslm] no local engine is up")
    return current


def down(path: Path) -> int:
    current = running_or_say(path)
    if current is None:
        with contextlib.suppress(OSError):
            path.unlink()  # a killed engine's file
        return 0
    pid = int(current["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    while live(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if live(pid):  # its watchdog still sweeps the SuperLink and Ray once it is gone
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        path.unlink()
    print(f"[fedslm] local engine at {current['superlink']} stopped")
    return 0


def status(path: Path) -> int:
    current = running_or_say(path)
    if current is None:
        return 1
    health = "healthy" if healthy(current["superlink"]) else "NOT answering"
    print(f"[fedslm] local engine at {current['superlink']} ({health}), Ray {current['ray']}, pid {current['pid']}")
    return 0 if health == "healthy" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedslm engine", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("up", "down", "status", "serve"))
    parser.add_argument(
        "--state", default="", help=f"state file (default: ${STATE_ENV}, else the cache dir's engine.json)"
    )
    parser.add_argument("--ray-cpus", type=int, default=0, help="cores the engine's Ray hands to clients (0: all)")
    args = parser.parse_args(argv)
    if args.ray_cpus < 0:
        print(f"error: --ray-cpus: must be >= 0 (0: every core), got {args.ray_cpus}", file=sys.stderr)
        return 2
    path = Path(args.state).expanduser() if args.state else state_file()
    if args.command == "serve":
        return serve(path, args.ray_cpus)
    if args.command == "up":
        return up(path, args.ray_cpus)
    return down(path) if args.command == "down" else status(path)


if __name__ == "__main__":
    sys.exit(main())
