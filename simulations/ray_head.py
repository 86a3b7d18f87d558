"""One Ray instance for every job of a sweep, started the way Flower starts its own.

Flower 1.41's simulation process calls ``ray.init()`` with no address for every run, which
starts a new Ray (GCS, raylet, agents: several seconds on two cores) and stops it when the
run ends. ``ray.init()`` connects to a running instance instead when ``RAY_ADDRESS`` is in
its environment, so the warm engine (``fedslm.simulations.warm_engine``) starts this
process once, hands ``RAY_ADDRESS`` to its SuperLink (whose simulation processes inherit
it) and each run's ``ray.shutdown()`` only disconnects. Runs still get their own Ray job
and their own ClientApp actors. A local engine (``fedslm engine up``,
``fedslm.simulations.engine``) holds one the same way, as the test suite's engine per
xdist worker does. Like a run's own Ray it
prestarts no idle worker for its first driver (``RAY_prestart_worker_first_driver=0`` in
``fedslm.simulations.launch.ENGINE_ENV``): none could serve Flower's actors.

This process is the instance's owner: it starts Ray with ``ray.init`` (as Flower would:
no dashboard, no Ray Client server, nothing written to ``/tmp/ray/ray_current_cluster``
that other ``ray.init()`` calls on the machine would follow), prints the address, and
stops Ray when its stdin closes (the launcher stopped it, or died) or on SIGTERM. Ray's
token authentication comes from the environment (``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``,
see ``fedslm.simulations.launch.ray_auth_env``), as in a run's own Ray.

    python -m fedslm.simulations.ray_head --temp-dir DIR [--num-cpus N]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

READY = "ray-address "
STARTUP_SECONDS = 120
SHUTDOWN_SECONDS = 20


@contextlib.contextmanager
def ray_head(home: Path, mark: str = "", *, verbose: bool = False, num_cpus: int = 0) -> Iterator[dict[str, str]]:
    """Start the shared Ray; yields the environment that points a SuperLink's runs at it
    (``RAY_ADDRESS`` and the instance's token). Its workers inherit this process's
    environment, hence the same quiet (or ``verbose``) settings as a run's own Ray."""
    from fedslm.simulations.launch import engine_env, ray_auth_env, stop_process_group

    auth = ray_auth_env()
    log_file = home / "ray_head.log"
    cmd = [
        sys.executable,
        "-m",
        "fedslm.simulations.ray_head",
        "--temp-dir",
        str(home / "ray"),
        "--num-cpus",
        str(num_cpus),
    ]
    env = {**engine_env(home, mark, verbose=verbose), **auth, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True
        )
    try:
        address = _wait_ready(proc, log_file)
        yield {**auth, "RAY_ADDRESS": address}
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # type: ignore[union-attr]
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=SHUTDOWN_SECONDS)
        stop_process_group(proc)


def _wait_ready(proc: subprocess.Popen, log_file: Path) -> str:
    from fedslm.simulations.launch import LaunchError

    assert proc.stdout is not None
    deadline, buffer = time.monotonic() + STARTUP_SECONDS, b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            chunk = proc.stdout.read1(4096)  # type: ignore[attr-defined]
            if not chunk:
                break
            buffer += chunk
            for line in buffer.decode(errors="replace").splitlines():
                if line.startswith(READY) and buffer.endswith(b"\n"):
                    return line[len(READY) :].strip()
        elif proc.poll() is not None:
            break
    code = proc.poll()
    raise LaunchError(
        f"the shared Ray did not start ({'exit code ' + str(code) if code is not None else 'timeout'}); see {log_file}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--temp-dir", required=True, help="Ray's session dir (short: Unix socket paths)")
    parser.add_argument("--num-cpus", type=int, default=0, help="0: every core, as Flower's ray.init")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is the launcher's
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    import ray

    ray.init(
        address="local",
        num_cpus=args.num_cpus or None,
        include_dashboard=False,
        _temp_dir=args.temp_dir,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        print(READY + ray.get_runtime_context().gcs_address, flush=True)
        sys.stdin.read()  # EOF: the launcher closed the pipe or is gone
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
