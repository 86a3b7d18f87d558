"""SecAgg+ end to end on Flower's real simulation engine: 4 clients, 2 rounds, one
client dropping after sharing its keys each round, distributed DP on top."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedslm.server.privacy import Release, user_level_epsilon
from tests.proc_util import run_cli, survivors

pytestmark = pytest.mark.e2e


def test_four_clients_two_rounds_with_a_dropout_and_distributed_dp(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc, marker = run_cli([
        "federation.num_clients=4", "federation.num_rounds=2", "training.local_steps=3",
        "data.docs_per_client=16", "training.eval_max_batches=2", "tracking.enabled=false",
        "strategy.min_train_clients=4",
        "secure_aggregation=secaggplus", "secure_aggregation.threshold=3",
        "secure_aggregation.simulate_dropout=0.25",  # partition 2 drops in rounds 1 and 2
        "privacy=dp_fedavg", "privacy.noise_multiplier=0.5", "privacy.clipping_norm=0.5",
        f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert survivors(marker) == []
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = {r["round"]: r for r in summary["rounds"]}
    for rnd in (1, 2):
        r = rounds[rnd]
        assert (r["secagg_survivors"], r["secagg_dropped"], r["secagg_abandoned"]) == (3, 1, 0)
        assert r["secagg_threshold"] == 3 and r["secagg_protocol_bytes_up"] > 0
        assert r["dp_effective_noise_multiplier"] == 0.5  # 3 survivors = threshold
        assert (r["secagg_weighted"], r["secagg_weight_total"]) == (0, 3)  # auto: equal under dp_fedavg
    # the ledger: two releases of z=0.5, 4 of 4 sampled, exactly DP-FedAvg's epsilon
    privacy = summary["privacy"]
    assert privacy["releases"] == 2
    assert privacy["epsilon_user"] == user_level_epsilon([Release(1, 0.5, 4, 4), Release(2, 0.5, 4, 4)],
                                                         delta=privacy["delta"])
    with open(run_dir / "clients.csv") as fh:
        train = [row for row in csv.DictReader(fh) if row["phase"] == "train"]
    assert sorted(row["status"] for row in train) == ["failed"] * 2 + ["ok"] * 6
    adapter = load_file(str(Path(summary["adapter_dir"]) / "adapter_model.safetensors"))
    assert all(np.isfinite(v).all() for v in adapter.values())
    assert any(np.abs(v).max() > 0 for n, v in adapter.items() if "lora_B" in n)  # it moved
    # no round's secrets are left in any client's state dir
    assert not list((run_dir / "clients").glob("*/secagg_*.json"))
