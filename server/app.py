"""Flower ServerApp: read the run config, run the experiment, leave a status file.

``flwr run`` exits 0 even when a ServerApp raises, so the launcher learns the outcome
from ``status.json`` in the run's output dir.

This module is light on purpose, like ``fedslm.client.app``: Flower loads the ServerApp and the
ClientApp under one import lock, and its simulation engine starts Ray only after both
are loaded. Importing torch here held Ray back by the ≈4 s torch, transformers and PEFT
take to import; ``fedslm.server.experiment`` (and torch with it) is imported by ``main``,
while Ray starts, under ``fedslm.warm_imports``'s lock.
"""

from __future__ import annotations

import json
import traceback
from logging import INFO

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedslm.quiet import quiet_process
from fedslm.runconfig import from_run_config
from fedslm.rundir import output_dir_for
from fedslm.warm_imports import import_heavy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = from_run_config(context.run_config)
    quiet_process(cfg.verbose)
    output_dir = output_dir_for(cfg.output_dir, context.run_id)
    output_dir.mkdir(parents=True, exist_ok=True)
    status = output_dir / "status.json"
    status.write_text(json.dumps({"status": "running"}))
    log(INFO, "[fedslm] outputs: %s", output_dir)  # `flwr run .` leaves them in ~/.cache
    try:
        # torch and the rest (see above); inside the try, so a failing import is reported
        experiment = import_heavy("fedslm.server.experiment")
        experiment.run_experiment(grid, cfg, output_dir)
    except BaseException as exc:
        status.write_text(json.dumps({
            "status": "error",
            "error": f"{type(exc).__name__}: {exc}".splitlines()[0],
            "traceback": traceback.format_exc(),
        }))
        raise
    status.write_text(json.dumps({"status": "ok"}))
