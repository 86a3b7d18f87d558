"""Where a client keeps its ledger, how a refusal travels, and the line a user reads at the end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedslm.client.node import this_node
from fedslm.client.privacy import BudgetExhausted, PrivacyLedger, save_ledger
from fedslm.client.task import fit
from fedslm.adapters import adapter_arrays
from fedslm.config import ExperimentConfig
from fedslm.rundir import cache_root
from fedslm.runconfig import to_run_config
from fedslm.runtime import peft_model
from fedslm.simulations.report import privacy_line


def _context(cfg: ExperimentConfig, **node_config) -> Context:
    return Context(run_id=77, node_id=5, node_config={"partition-id": 2, **node_config},
                   state=RecordDict(), run_config=to_run_config(cfg))


def test_client_state_dir_follows_the_run_or_the_device(tmp_path: Path) -> None:
    """One rule: a device's state-dir as given, else <output>/clients/<partition id>."""
    cfg = ExperimentConfig.from_dict({"output_dir": str(tmp_path)})
    assert this_node(cfg, _context(cfg)).state_dir == tmp_path / "clients" / "2"
    assert this_node(cfg, _context(cfg, **{"state-dir": "/var/lib/fedslm"})).state_dir == Path("/var/lib/fedslm")
    no_dir = ExperimentConfig.from_dict({})
    assert this_node(no_dir, _context(no_dir)).state_dir == cache_root() / "runs/77/clients/2"


def test_fit_refuses_with_the_partition_when_the_ledger_is_spent(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict({"federation": {"num_clients": 3},
                                      "privacy": {"mode": "dp_sgd", "max_epsilon": 1.0, "delta": 1e-3}})
    model, _ = peft_model(cfg.model, cfg.peft, data_seed=cfg.data.seed)
    arrays = adapter_arrays(model)
    save_ledger(PrivacyLedger(history=[(1.0, 0.5, 100)], rounds=[1]), tmp_path / "1",
                accountant="prv", delta=1e-3)
    with pytest.raises(BudgetExhausted) as refused:
        fit(cfg, arrays, partition_id=1, server_round=2, client_dir=tmp_path / "1")
    assert refused.value.metrics["partition-id"] == 1
    assert refused.value.metrics["dp-epsilon"] > 1.0
    assert all(np.array_equal(v, adapter_arrays(model)[k]) for k, v in arrays.items())


def test_the_final_privacy_line() -> None:
    assert privacy_line({"mode": "dp_sgd", "epsilon_sample_max": 3.14159, "delta": 0.002,
                         "stopped_early": None}) == (
        "sample-level epsilon 3.14 at delta <= 0.002 (per record, max over clients)")
    assert privacy_line({"mode": "dp_fedavg", "epsilon_user": 12.345, "delta": 1e-5, "releases": 3,
                         "stopped_early": "privacy budget exhausted: x"}) == (
        "user-level epsilon 12.3 at delta 1e-05 (whole client contribution, 3 releases); "
        "stopped early: privacy budget exhausted: x")
    assert privacy_line({"mode": "dp_sgd", "stopped_early": None}) == "dp_sgd: nothing released"
