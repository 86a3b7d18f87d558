"""Whatever ends the launcher, nothing it started outlives it.

The launcher starts this watchdog in its own session (so a kill of the launcher's
process group spares it) with the read end of a pipe as stdin; the launcher holds the
only write end. The pipe reaches EOF however the launcher ends — SIGINT, SIGTERM,
SIGKILL, a crash — without polling a pid that could be reused. Then the watchdog:

1. SIGTERMs every process carrying the run's environment mark (the SuperLink, SuperExec,
   ServerApp, the simulation process and Ray's processes all inherit it), SIGKILLs what
   is left after a short grace;
2. removes the run's temp dir;
3. unless the launcher said ``done`` first: marks ``status.json`` ``killed`` and the
   run's RUNNING MLflow run KILLED.

A run on a local engine that outlives it (``federation.superlink``, ``fedslm engine up``)
has its ServerApp and ClientApps under that engine, not under the launcher: with
``--stop-flower-run`` the watchdog first asks the engine to stop the Flower run
(``flwr stop``, the id ``flwr run`` printed) unless the launcher said ``done``.

    python -m fedslm.simulations.watchdog --mark M --tmp DIR [--output-dir D --tracking-uri U --experiment E]
        [--stop-flower-run]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

MARK_ENV = "FEDSLM_RUN_MARK"
DONE = b"done"
GRACE_SECONDS = 3.0
RUN_ID_FILE = "flower_run_id"  # in the run's temp dir (its FLWR_HOME), written by the launcher
STOP_SECONDS = 30.0


def live(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie or a dead process does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def marked_pids(mark: str) -> list[int]:
    """Live (not zombie) processes whose environment holds ``MARK_ENV=mark``."""
    needle = f"{MARK_ENV}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:
            continue
        if live(int(entry.name)):
            found.append(int(entry.name))
    return found


def stop_marked(mark: str, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM the marked processes, SIGKILL those left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in marked_pids(mark):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while marked_pids(mark) and time.monotonic() < deadline:
            time.sleep(0.1)


def mark_run_killed(output_dir: str, tracking_uri: str, experiment: str) -> None:
    status = Path(output_dir) / "status.json"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(status.read_text()).get("status") == "running":
            status.write_text(json.dumps({"status": "killed",
                                          "error": "the launcher was killed during the run"}))
    if tracking_uri:
        with contextlib.suppress(Exception):  # a tracking store we cannot reach: nothing to mark
            from fedslm.server.tracking import mark_killed

            mark_killed(tracking_uri, experiment, output_dir)


def stop_flower_run(flwr_home: Path) -> None:
    """``flwr stop`` of the run recorded in ``flwr_home`` (its connection is there too);
    nothing if ``flwr run`` never got as far as starting one."""
    try:
        run_id = (flwr_home / RUN_ID_FILE).read_text().strip()
    except OSError:
        return
    from fedslm.flower_tools import flower_bin, flower_env

    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run([flower_bin("flwr"), "stop", run_id, "fedslm"], env=flower_env({"FLWR_HOME": str(flwr_home)}),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=STOP_SECONDS)


def start(*, mark: str, tmp: Path, output_dir: str = "", tracking_uri: str = "",
          experiment: str = "", stop_flower_run: bool = False) -> tuple[subprocess.Popen, int]:
    """Start the watchdog; returns it and the write end the launcher keeps open
    (``finish`` closes it)."""
    read_end, write_end = os.pipe()
    env = {k: v for k, v in os.environ.items() if k != MARK_ENV}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "fedslm.simulations.watchdog", "--mark", mark, "--tmp", str(tmp),
           "--output-dir", output_dir, "--tracking-uri", tracking_uri, "--experiment", experiment,
           *(["--stop-flower-run"] if stop_flower_run else [])]
    proc = subprocess.Popen(cmd, stdin=read_end, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(read_end)
    return proc, write_end


def finish(proc: subprocess.Popen, write_end: int, *, done: bool) -> None:
    """The launcher's normal end: tell the watchdog whether the run completed, let it sweep."""
    with contextlib.suppress(OSError):
        if done:
            os.write(write_end, DONE)
        os.close(write_end)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--mark", "--tmp", "--output-dir", "--tracking-uri", "--experiment"):
        parser.add_argument(name, default="")
    parser.add_argument("--stop-flower-run", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is the launcher's
    received = b""
    while chunk := os.read(sys.stdin.fileno(), 64):
        received += chunk
    if args.stop_flower_run and received != DONE and args.tmp:
        stop_flower_run(Path(args.tmp))
    stop_marked(args.mark)
    if args.tmp:
        shutil.rmtree(args.tmp, ignore_errors=True)
    if received != DONE and args.output_dir:
        mark_run_killed(args.output_dir, args.tracking_uri, args.experiment)


if __name__ == "__main__":
    main()
