"""One local SuperLink for every job of a Hydra ``-m`` sweep.

A job on its own starts a private SuperLink and stops it at the end
(``fedslm.simulations.launch.simulation_superlink``). The jobs of a sweep run one after
another in one process (Hydra's basic launcher, and the Optuna sweeper's ``n_jobs: 1``), so
they share one: each job is still its own ``flwr run`` (its own Flower run, simulation
runtime and MLflow run) against it. The SuperLink is stopped, with everything it started,
when the process exits however it exits: the sweep ends, a job fails (``sys.exit``),
Ctrl-C (KeyboardInterrupt) or SIGTERM. A job that needs a different SuperLink environment
(``verbose``) gets a fresh one.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import tempfile
from pathlib import Path

from fedslm.simulations.launch import simulation_superlink


class WarmEngine:
    """The process's shared SuperLink; ``address(verbose)`` starts it on first use."""

    def __init__(self) -> None:
        self._stack: contextlib.ExitStack | None = None
        self._key: bool | None = None
        self.home: Path | None = None
        self._address = ""
        self.starts = 0

    def address(self, *, verbose: bool) -> str:
        if self._stack is not None and self._key == verbose:
            return self._address
        self.stop()
        stack = contextlib.ExitStack()
        try:
            self.home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedslm-warm-")))
            self._address = stack.enter_context(simulation_superlink(self.home, verbose=verbose))
        except BaseException:
            stack.close()
            raise
        self._stack, self._key = stack, verbose
        self.starts += 1
        return self._address

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
