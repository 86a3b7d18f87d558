"""Deferred heavy imports run one at a time, and a failing one is reported by the ServerApp."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

import fedslm.warm_imports as warm
from fedslm.config import ExperimentConfig
from fedslm.runconfig import to_run_config


def test_two_threads_never_import_at_the_same_time(monkeypatch) -> None:
    active, peak = [0], [0]

    def slow_import(name: str):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        active[0] -= 1
        return name

    monkeypatch.setattr(warm.importlib, "import_module", slow_import)
    threads = [threading.Thread(target=warm.import_heavy, args=(f"m{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1


def test_a_serverapp_whose_experiment_cannot_be_imported_writes_the_error(tmp_path: Path,
                                                                          monkeypatch) -> None:
    import fedslm.server.app as server_app

    def broken(name: str):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(server_app, "import_heavy", broken)
    cfg = ExperimentConfig.from_dict({"output_dir": str(tmp_path)})
    context = Context(run_id=5, node_id=0, node_config={}, state=RecordDict(),
                      run_config=to_run_config(cfg))
    with pytest.raises(ImportError):
        server_app.main(None, context)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "error"
    assert status["error"] == "ImportError: No module named 'fedslm.server.experiment'"
