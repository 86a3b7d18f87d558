"""Run the FedSLM Flower apps on Flower's own engines via ``flwr run``.

Simulation: a private ``flower-superlink --simulation`` on a free 127.0.0.1 port with its
own FLWR_HOME, so nothing depends on (or leaks into) ``~/.flwr`` or a SuperLink started
earlier; it and everything it spawned (ServerApp, Ray) are stopped when the run ends.
Remote: the same ``flwr run`` against a SuperLink the operator runs.

Every process started here carries the run's environment mark, and a watchdog
(``fedslm.simulations.watchdog``) ends all of them and removes the temp dir however the
launcher ends, a SIGKILL of its process group included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from fedslm.errors import LaunchError  # noqa: F401 - raised here, importable without Flower
from fedslm.config import ConfigError, ExperimentConfig, is_loopback
from fedslm.flower_tools import flower_bin, flower_env
from fedslm.quiet import QUIET_ENV
from fedslm.runconfig import PROJECT_ROOT, to_run_config
from fedslm.simulations import watchdog
from fedslm.simulations.app_dir import stage_app
from fedslm.simulations.progress import RunProgress

if TYPE_CHECKING:
    from fedslm.simulations.warm_engine import WarmEngine

CONNECTION = "fedslm"
STARTED_RUN = re.compile(r"Successfully started run (\d+)")  # `flwr run`'s line
STARTUP_SECONDS = 90
ENGINE_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "HF_HUB_OFFLINE": "1",
    # Ray prestarts num-cpus idle workers for the first driver (here: the run's simulation
    # process); none can serve Flower's actors, whose job has its own runtime env (PYTHONPATH),
    # so each was started, imported Ray and was killed unused (docs/deployment.md).
    "RAY_prestart_worker_first_driver": "0",
}
RAY_CHECK_SECONDS = 3.0
# The local SuperExec looks for a new run every second by default (Flower 1.41): ~0.5 s
# of every job spent waiting for its simulation process to start. 0.25 s takes most of
# that off each job for ~0.2 CPU-seconds of polling per job (docs/benchmarks.md); a value
# the user set is kept.
SUPEREXEC_POLL = ("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.25")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_env(flwr_home: Path, mark: str = "", *, verbose: bool = False) -> dict[str, str]:
    env = flower_env(ENGINE_ENV, {} if verbose else QUIET_ENV, {"FLWR_HOME": str(flwr_home)},
                     {watchdog.MARK_ENV: mark} if mark else {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault(*SUPEREXEC_POLL)
    return env


def wait_healthy(address: str, process: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LaunchError(f"flower-superlink exited with code {process.returncode}; see {log_file}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://{address}/health", timeout=1.0).is_success:
                return
        time.sleep(0.2)
    raise LaunchError(f"flower-superlink did not become healthy in {STARTUP_SECONDS}s; see {log_file}")


def stop_process_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)


def ray_auth_env() -> dict[str, str]:
    """Ray's token authentication, with a fresh token per run. Ray 2.55's gRPC servers
    bind every interface whatever node address is given (there is no loopback-only
    switch), so without a token any host that reaches this machine could submit work
    to the simulation's Ray; the token lives only in the environment of the run's own
    processes (readable by the same user alone)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def check_ray_address(cfg: ExperimentConfig) -> None:
    """``federation.ray_address``, before anything starts: a Ray head that does not answer
    would otherwise fail inside the simulation process, after the SuperLink started."""
    address = cfg.federation.ray_address
    if cfg.federation.engine != "simulation" or not address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CHECK_SECONDS).close()
    except OSError as err:
        raise ConfigError(f"federation.ray_address: nothing answers at {address} "
                          f"({type(err).__name__}: {err.strerror or str(err) or 'no answer'}); start it "
                          "with `ray start --head`, or leave it empty for a Ray per run") from None


ENGINE_CHECK_SECONDS = 3.0


def check_superlink(cfg: ExperimentConfig) -> None:
    """``federation.superlink``, before anything starts: a local engine that is not up
    would otherwise fail inside ``flwr run`` after its retries."""
    address = cfg.federation.superlink
    if cfg.federation.engine != "simulation" or not address:
        return
    try:
        healthy = httpx.get(f"http://{address}/health", timeout=ENGINE_CHECK_SECONDS).is_success
    except httpx.HTTPError as err:
        healthy, why = False, f"{type(err).__name__}: {str(err)[:120] or 'no answer'}"
    else:
        why = "it is not a healthy SuperLink"
    if not healthy:
        raise ConfigError(f"federation.superlink: no local engine answers at {address} ({why}); start "
                          "one with `fedslm engine up`, or leave it empty for a SuperLink per run")


def running_ray_env(address: str) -> dict[str, str]:
    """Points a SuperLink's runs at the Ray at ``address``. Nothing else: its token (if it
    wants one) is the user's own ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``, passed through."""
    return {"RAY_ADDRESS": address}


def superlink_env(flwr_home: Path, mark: str = "", *, verbose: bool = False,
                  ray_env: dict[str, str] | None = None) -> dict[str, str]:
    """The simulation SuperLink's environment, which its runs' simulation processes inherit:
    a Ray per run with a fresh token unless ``ray_env`` names a running one (``RAY_ADDRESS``,
    and the token of a sweep's own instance: ``fedslm.simulations.warm_engine``;
    ``running_ray_env`` for a user's). A ``RAY_ADDRESS`` in the launcher's environment is
    not followed: ``federation.ray_address`` decides."""
    env = engine_env(flwr_home, mark, verbose=verbose)
    env.pop("RAY_ADDRESS", None)
    env.update(ray_auth_env() if ray_env is None else ray_env)
    return env


@contextlib.contextmanager
def simulation_superlink(flwr_home: Path, mark: str = "", *, verbose: bool = False,
                         ray_env: dict[str, str] | None = None) -> Iterator[str]:
    """A SuperLink in simulation mode on a free local port; yields its address. Its
    runs' Ray: ``superlink_env``."""
    address = f"127.0.0.1:{free_port()}"
    log_file = flwr_home / "superlink.log"
    cmd = [flower_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
           "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
           "--port", address.rsplit(":", 1)[1]]
    env = superlink_env(flwr_home, mark, verbose=verbose, ray_env=ray_env)
    with open(log_file, "wb") as log:
        process = subprocess.Popen(cmd, env=env,
                                   stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(address, process, log_file)
        yield address
    finally:
        stop_process_group(process)


def write_connection(flwr_home: Path, address: str, *, root_certificates: str = "") -> None:
    """The ``flwr`` CLI's config.toml naming one SuperLink connection."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{address}"']
    lines.append(f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def write_run_config(cfg: ExperimentConfig, path: Path) -> Path:
    """The flat run config as a TOML file for ``flwr run --run-config``."""
    lines = []
    for key, value in to_run_config(cfg).items():
        lines.append(f'"{key}" = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}')
    path.write_text("\n".join(lines) + "\n")
    return path


def flwr_run(cfg: ExperimentConfig, flwr_home: Path, *, federation_config: str | None,
             mark: str = "") -> None:
    """``flwr run <project> fedslm --stream``, echoing the ServerApp's log lines."""
    run_config = write_run_config(cfg, flwr_home / "run_config.toml")
    app = stage_app(PROJECT_ROOT, flwr_home / "app")
    cmd = [flower_bin("flwr"), "run", str(app), CONNECTION, "--run-config", str(run_config),
           "--stream"]
    if federation_config:
        cmd += ["--federation-config", federation_config]
    process = subprocess.Popen(cmd, env=engine_env(flwr_home, mark, verbose=cfg.verbose),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               bufsize=1, start_new_session=True)
    progress = RunProgress(cfg.federation.num_rounds, verbose=cfg.verbose)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if match := STARTED_RUN.search(line):  # for the watchdog: the run to stop on an engine
                (flwr_home / watchdog.RUN_ID_FILE).write_text(match.group(1))
            progress.feed(line)
        process.wait()
    finally:
        progress.close()
        stop_process_group(process, grace=5.0)
    if process.returncode != 0:
        raise LaunchError(f"flwr run exited with code {process.returncode}")


def read_outcome(output_dir: Path, log_hint: Path | None) -> dict:
    """The run's summary, or a LaunchError carrying the ServerApp's own error line."""
    status_file = output_dir / "status.json"
    hint = f"; see {log_hint}" if log_hint else ""
    if not status_file.exists():
        raise LaunchError(f"the ServerApp never started (no {status_file}){hint}")
    status = json.loads(status_file.read_text())
    if status.get("status") != "ok":
        raise LaunchError(f"the run failed: {status.get('error', status.get('status'))} "
                          f"(traceback in {status_file})")
    return json.loads((output_dir / "summary.json").read_text())


def simulation_federation_config(cfg: ExperimentConfig, *, warm: bool = False) -> str:
    """``flwr run --federation-config``: SuperNodes (one per client unless
    ``federation.supernodes``), client resources and, for a run that starts its own Ray,
    the cores it may use (``federation.ray_cpus``; a warm engine's shared Ray was started
    with them, and a run that connects to a running Ray, ``federation.ray_address``
    included, may not pass init args)."""
    fed = cfg.federation
    config = (f"num-supernodes={fed.supernodes or fed.num_clients} "
              f"client-resources-num-cpus={fed.client_num_cpus} "
              f"client-resources-num-gpus={fed.client_num_gpus}")
    if fed.ray_cpus and not warm and not fed.ray_address:
        config += f" init-args-num-cpus={fed.ray_cpus}"
    return config


@contextlib.contextmanager
def watched_tmp(cfg: ExperimentConfig, *, mark_run: bool) -> Iterator[tuple[Path, str]]:
    """A temp dir and an environment mark, both swept by a watchdog when the launcher
    ends by any means; with ``mark_run`` a launcher that dies marks the run killed."""
    tmp, mark = Path(tempfile.mkdtemp(prefix="fedslm-flwr-")), uuid.uuid4().hex
    uri = ""
    if mark_run and cfg.tracking.enabled:
        uri = cfg.tracking.uri or "sqlite:///" + str((Path(cfg.output_dir).parent / "mlflow.db").resolve())
    proc, write_end = watchdog.start(mark=mark, tmp=tmp, output_dir=cfg.output_dir if mark_run else "",
                                     tracking_uri=uri, experiment=cfg.tracking.experiment,
                                     stop_flower_run=mark_run and bool(cfg.federation.superlink))
    done = False
    try:
        yield tmp, mark
        done = True
    finally:
        watchdog.finish(proc, write_end, done=done)


def run_on_simulation(cfg: ExperimentConfig, *, warm: WarmEngine | None = None) -> dict:
    """Run the experiment on Flower's simulation engine and return its summary; on a
    private SuperLink, on a sweep's ``warm`` one (``fedslm.simulations.warm_engine``) or on
    a running local engine (``federation.superlink``, ``fedslm engine up``). Virtual
    clients run on ``federation.ray_address`` when set, else on a Ray per run (or the
    sweep's, or the engine's). A watchdog ends what the run started if the launcher dies
    (``watched_tmp``; on a running engine it stops the Flower run there)."""
    check_ray_address(cfg)
    check_superlink(cfg)
    ray_address, engine = cfg.federation.ray_address, cfg.federation.superlink
    with watched_tmp(cfg, mark_run=True) as (flwr_home, mark):
        federation = simulation_federation_config(cfg, warm=warm is not None or bool(engine))
        log_file: Path | None = None  # a running engine's log is its own, not this run's
        if engine:
            write_connection(flwr_home, engine)
            flwr_run(cfg, flwr_home, federation_config=federation, mark=mark)
        elif warm is None:
            ray_env = running_ray_env(ray_address) if ray_address else None
            with simulation_superlink(flwr_home, mark, verbose=cfg.verbose, ray_env=ray_env) as address:
                write_connection(flwr_home, address)
                flwr_run(cfg, flwr_home, federation_config=federation, mark=mark)
            log_file = flwr_home / "superlink.log"
        else:
            write_connection(flwr_home, warm.address(verbose=cfg.verbose, ray_cpus=cfg.federation.ray_cpus,
                                                     ray_address=ray_address))
            flwr_run(cfg, flwr_home, federation_config=federation, mark=mark)
            warm.record(Path(cfg.output_dir))
            log_file = warm.log_file
        log_copy = None
        if log_file is not None:
            log_copy = Path(cfg.output_dir) / "superlink.log"
            with contextlib.suppress(OSError):
                log_copy.write_bytes(log_file.read_bytes())
    return read_outcome(Path(cfg.output_dir), log_copy)


def run_on_remote(cfg: ExperimentConfig) -> dict:
    """Submit the experiment to a running SuperLink at ``federation.address`` (killing
    the launcher ends the local ``flwr run``, not the run on the SuperLink)."""
    fed = cfg.federation
    if fed.insecure and not is_loopback(fed.address.rsplit(":", 1)[0]):
        print(f"[fedslm] WARNING: submitting to {fed.address} without TLS "
              "(federation.i_know_this_is_insecure): the config and every adapter cross the "
              "network in clear text", file=sys.stderr, flush=True)
    with watched_tmp(cfg, mark_run=False) as (flwr_home, mark):
        write_connection(flwr_home, cfg.federation.address,
                         root_certificates=cfg.federation.root_certificates)
        flwr_run(cfg, flwr_home, federation_config=None, mark=mark)
    return read_outcome(Path(cfg.output_dir), None)
