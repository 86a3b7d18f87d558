"""One local SuperLink and one Ray for every job of a Hydra ``-m`` sweep.

A job on its own starts a private SuperLink and stops it at the end
(``fedslm.simulations.launch.simulation_superlink``). The jobs of a sweep run one after
another in one process (Hydra's basic launcher, and the Optuna sweeper's ``n_jobs: 1``), so
they share one SuperLink and one Ray instance (``fedslm.simulations.ray_head``; its address
reaches each run's simulation process through the SuperLink's environment, and Flower's
``ray.init()`` connects instead of starting a Ray per run). Each job is still its own
``flwr run``: its own Flower run, simulation process, Ray job, ClientApp actors and MLflow
run. Everything is stopped when the process exits however it exits: the sweep ends, a job
fails (``sys.exit``), Ctrl-C (KeyboardInterrupt) or SIGTERM; a watchdog outside the
launcher's session does the same if the launcher is killed (SIGKILL included). A job that
needs a different engine environment (``verbose``, ``federation.ray_cpus`` or
``federation.ray_address``) gets a fresh one. With ``federation.ray_address`` the sweep's
runs use that Ray (the user's: never stopped here) and no Ray is started.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import signal
import tempfile
import uuid
from pathlib import Path

from fedslm.simulations import watchdog
from fedslm.simulations.launch import running_ray_env, simulation_superlink
from fedslm.simulations.ray_head import ray_head


class WarmEngine:
    """The process's shared SuperLink and Ray; ``address(verbose)`` starts them on first use.

    ``shared_ray=False`` keeps a Ray per run (as a single job has); ``ray_cpus`` > 0 caps
    the shared Ray's CPUs (what Flower's ``init-args-num-cpus`` does for a run's own Ray,
    which a run connecting to a running Ray may not pass)."""

    def __init__(self, *, shared_ray: bool = True, ray_cpus: int = 0) -> None:
        self.shared_ray, self.ray_cpus = shared_ray, ray_cpus
        self._stack: contextlib.ExitStack | None = None
        self._key: tuple[bool, int, str] | None = None
        self.home: Path | None = None
        self._address = ""
        self.mark = ""
        self.ray_address = ""
        self.starts = 0

    def address(self, *, verbose: bool, ray_cpus: int | None = None, ray_address: str = "") -> str:
        """The SuperLink's address; a job asking for another ``verbose``, Ray size
        (``ray_cpus``, None: this engine's own) or running Ray (``ray_address``, "": the
        engine's own Ray) gets a fresh engine."""
        ray_cpus = self.ray_cpus if ray_cpus is None else ray_cpus
        key = (verbose, ray_cpus, ray_address)
        if self._stack is not None and self._key == key:
            return self._address
        self.stop()
        self.ray_cpus = ray_cpus
        stack = contextlib.ExitStack()
        try:
            home = self.home = Path(tempfile.mkdtemp(prefix="fedslm-warm-"))
            stack.callback(shutil.rmtree, home, ignore_errors=True)
            mark = self.mark = uuid.uuid4().hex  # every process the engine starts carries it
            proc, write_end = watchdog.start(mark=mark, tmp=home)
            stack.callback(watchdog.finish, proc, write_end, done=True)
            ray_env = None
            if ray_address:
                ray_env = running_ray_env(ray_address)
            elif self.shared_ray:
                ray_env = stack.enter_context(ray_head(home, mark, verbose=verbose, num_cpus=self.ray_cpus))
            self.ray_address = ray_env["RAY_ADDRESS"] if ray_env else ""
            self._address = stack.enter_context(simulation_superlink(home, mark, verbose=verbose, ray_env=ray_env))
        except BaseException:
            stack.close()
            raise
        self._stack, self._key = stack, key
        self.starts += 1
        return self._address

    def record(self, output_dir: Path) -> None:
        """``engine.json`` in a job's output dir: the shared SuperLink and Ray it ran on, and
        the Ray jobs that instance has served so far (one per run's simulation process)."""
        ray_jobs = (
            sorted(
                {
                    p.name.split("_")[0].rsplit("-", 1)[-1][:8]
                    for p in (self.home / "ray").glob("session_*/logs/python-core-driver-*")
                }
            )
            if self.home is not None and self.ray_address
            else []
        )
        with contextlib.suppress(OSError):
            (output_dir / "engine.json").write_text(
                json.dumps({"superlink": self._address, "ray": self.ray_address, "ray_jobs": ray_jobs}) + "\n"
            )

    @property
    def log_file(self) -> Path | None:
        return self.home / "superlink.log" if self.home is not None else None

    def stop(self) -> None:
        stack, self._stack, self._key = self._stack, None, None
        if stack is not None:
            stack.close()


ENGINE = WarmEngine()
atexit.register(ENGINE.stop)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    ENGINE.stop()
    raise SystemExit(128 + signum)


def install_sigterm_handler() -> None:
    """SIGTERM ends the process through ``atexit`` too (Python's default skips it)."""
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
