"""Privacy end to end on Flower's real simulation engine, with a real MLflow store.

Tiny federations (3 clients) so each run takes well under a minute; every process the
launcher starts (SuperLink, ServerApp, Ray) is stopped by it when the run ends.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import pytest

from fedslm.client.dp_sgd import plan_round
from fedslm.client.privacy import PrivacyLedger, epsilon_of, ledger_path, load_ledger, save_ledger
from fedslm.config import ExperimentConfig
from fedslm.runtime import client_split, peft_model, token_blocks
from fedslm.server.privacy import Release, user_level_epsilon
from fedslm.simulations.launch import run_on_simulation
from tests.proc_util import on_test_ray
from tests.stores import sqlite_store

pytestmark = pytest.mark.e2e


def _config(tmp_path: Path, **overrides) -> ExperimentConfig:
    data = {"federation": on_test_ray({"num_clients": 3, "num_rounds": 2, "round_timeout": 120.0}),
            "training": {"local_steps": 5, "eval_max_batches": 2},
            "tracking": {"uri": sqlite_store(tmp_path / "mlflow.db"), "experiment": "dp-e2e"},
            "output_dir": str(tmp_path / "run")}
    for group, values in overrides.items():
        data.setdefault(group, {}).update(values)
    return ExperimentConfig.from_dict(data)


def _rounds(path: Path) -> list[dict]:
    with open(path / "rounds.csv") as fh:
        return list(csv.DictReader(fh))


def _mlflow_history(summary: dict, key: str) -> list[tuple[int, float]]:
    client = mlflow.MlflowClient(tracking_uri=summary["mlflow_uri"])
    return sorted((m.step, m.value) for m in client.get_metric_history(summary["mlflow_run_id"], key))


def test_dp_sgd_budget_refusals_and_a_clean_stop(tmp_path: Path):
    """Client 0 starts at its budget and refuses; 1 and 2 train in round 1, reach the budget
    and refuse in round 2; too few clients are left for round 3, so the run ends cleanly."""
    probe = _config(tmp_path, privacy={"mode": "dp_sgd", "noise_multiplier": 1.0, "delta": 1e-3})
    _, tok = peft_model(probe.model, probe.peft, data_seed=probe.data.seed)
    one, two = [], []
    for pid in (1, 2):
        blocks = token_blocks(client_split(probe.data, num_clients=3, partition_id=pid).train, tok,
                              seq_len=probe.training.seq_len)
        b = plan_round(probe.privacy, probe.training, num_records=len(blocks))
        one.append(epsilon_of([(b.noise_multiplier, b.sample_rate, b.steps)], accountant="prv", delta=b.delta))
        two.append(epsilon_of([(b.noise_multiplier, b.sample_rate, 2 * b.steps)], accountant="prv", delta=b.delta))
    budget = (max(one) + min(two)) / 2
    assert max(one) < budget < min(two)  # each of 1, 2 fits exactly one round
    cfg = _config(tmp_path, federation={"num_rounds": 3},
                  privacy={"mode": "dp_sgd", "noise_multiplier": 1.0, "delta": 1e-3, "max_epsilon": budget})
    exhausted = Path(cfg.output_dir) / "clients" / "0"
    save_ledger(PrivacyLedger(history=[(1.0, 0.2, 500)], rounds=[0]), exhausted, accountant="prv", delta=1e-3)
    seeded = ledger_path(exhausted).read_text()

    summary = run_on_simulation(cfg)

    rounds = {int(r["round"]): r for r in _rounds(Path(cfg.output_dir))}
    assert sorted(rounds) == [0, 1, 2]  # round 3 never started
    assert summary["privacy"]["stopped_early"].startswith("privacy budget exhausted: 3 of 3 clients")
    assert [float(rounds[r]["dp_clients_refused"]) for r in (1, 2)] == [1.0, 3.0]
    assert float(rounds[1]["train_clients"]) == 2.0 and rounds[2]["train_clients"] == ""
    assert ledger_path(exhausted).read_text() == seeded  # never reset, never extended
    for pid, first in zip((1, 2), one):
        ledger = load_ledger(Path(cfg.output_dir) / "clients" / str(pid))
        assert ledger.rounds == [1]
        saved = json.loads(ledger_path(Path(cfg.output_dir) / "clients" / str(pid)).read_text())
        assert saved["epsilon"] == pytest.approx(first, abs=1e-6) and saved["epsilon"] <= budget
    seeded_eps = epsilon_of([(1.0, 0.2, 500)], accountant="prv", delta=1e-3)
    logged = _mlflow_history(summary, "dp_epsilon_sample_max")
    assert [s for s, _ in logged] == [1, 2] and logged[1][1] == pytest.approx(seeded_eps, abs=1e-6)
    assert _mlflow_history(summary, "dp_clients_refused") == [(1, 1.0), (2, 3.0)]
    assert _mlflow_history(summary, "dp_epsilon_sample_mean")[0][1] == pytest.approx(
        (seeded_eps + sum(one)) / 3, abs=1e-6)


def test_dp_fedavg_client_side_adaptive_clipping_on_the_engine(tmp_path: Path):
    cfg = _config(tmp_path, privacy={"mode": "dp_fedavg", "noise_multiplier": 0.8, "clipping": "adaptive",
                                     "clip_side": "client", "clipped_count_stddev": 1.0, "delta": 1e-3})
    summary = run_on_simulation(cfg)
    out = Path(cfg.output_dir)
    state = json.loads((out / "server_privacy.json").read_text())
    assert state["rounds_done"] == 2 and len(state["releases"]) == 2
    expected = user_level_epsilon([Release(r, 0.8, 3, 3) for r in (1, 2)], delta=1e-3)
    logged = _mlflow_history(summary, "dp_epsilon_user")
    assert [s for s, _ in logged] == [1, 2] and logged[1][1] == pytest.approx(expected, abs=1e-6)
    assert logged[0][1] < logged[1][1]
    assert summary["privacy"]["epsilon_user"] == pytest.approx(expected, abs=1e-6)
    with open(out / "clients.csv") as fh:
        train_rows = [r for r in csv.DictReader(fh) if r["phase"] == "train"]
    assert len(train_rows) == 6 and all(r["norm_bit"] in ("0", "1") for r in train_rows)  # Flower's mod ran
    clip, following = _mlflow_history(summary, "dp_clip_norm"), _mlflow_history(summary, "dp_clip_norm_next")
    assert clip[0] == (1, 0.1) and clip[1][1] == pytest.approx(following[0][1])  # round 2 clips to the adapted norm
    assert state["clipping_norm"] == pytest.approx(following[1][1])  # and the saved state holds the next one
