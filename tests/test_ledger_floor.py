"""The server never lets a client's DP-SGD ledger shrink unnoticed: per client it keeps the
highest (epsilon, total steps) reported, rejects a reply that went backwards, and the
figures survive a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from fedslm.config import ExperimentConfig
from fedslm.server.checkpoint import checkpoint_path, load_checkpoint, make_checkpoint, restore_hooks, save_checkpoint
from fedslm.server.privacy_rounds import RoundPrivacy
from fedslm.server.rounds import History
from tests.proc_util import on_test_ray


def _cfg(engine: str = "simulation") -> ExperimentConfig:
    fed = {"num_clients": 3}
    if engine == "remote":
        fed.update(engine="remote", address="10.0.0.1:9093", root_certificates="/ca.pem")
    return ExperimentConfig.from_dict({"federation": fed,
                                       "privacy": {"mode": "dp_sgd", "noise_multiplier": 1.0}})


def _reply(node: int, pid: int, epsilon: float, total: int, steps: int = 10) -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id="q", group_id="1", created_at=0.0, ttl=60.0,
                        message_type="train")
    metrics = {"num-examples": 5, "partition-id": pid, "dp-epsilon": epsilon,
               "dp-delta": 1e-3, "dp-steps": steps, "dp-steps-total": total}
    return make_message(metadata, RecordDict({
        "arrays": ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
        "metrics": MetricRecord(metrics)}))


def test_a_reply_whose_ledger_went_backwards_is_rejected_and_named() -> None:
    rp = RoundPrivacy(_cfg())
    kept, rejected = rp.check_ledgers([_reply(7, 0, 2.5, 10), _reply(8, 1, 1.0, 10)])
    assert len(kept) == 2 and rejected == {}
    assert rp.ledgers == {"partition 0": (2.5, 10), "partition 1": (1.0, 10)}
    # partition 0 lowered its history (epsilon and steps), partition 1 deleted privacy.json
    lowered, fresh, honest = _reply(7, 0, 2.0, 20), _reply(8, 1, 0.9, 10), _reply(9, 2, 0.5, 10)
    kept, rejected = rp.check_ledgers([lowered, fresh, honest])
    assert kept == [honest]
    assert rejected == {
        7: "privacy ledger: went backwards: epsilon 2 after 20 steps, but it had reported "
           "epsilon 2.5 after 10 steps (privacy.json deleted or lowered?)",
        8: "privacy ledger: went backwards: epsilon 0.9 after 10 steps, but it had reported "
           "epsilon 1 after 10 steps (privacy.json deleted or lowered?)"}
    assert rp.ledgers["partition 0"] == (2.5, 10)  # a rejected reply never lowers the floor


def test_a_reply_without_ledger_figures_is_rejected() -> None:
    rp = RoundPrivacy(_cfg())
    reply = _reply(7, 0, 1.0, 10)
    del reply.content.metric_records["metrics"]["dp-steps-total"]
    assert rp.check_ledgers([reply]) == ([], {7: "privacy ledger: no DP-SGD ledger figures "
                                              "(dp-epsilon, dp-steps-total) in the reply"})


def test_in_deployment_the_ledger_is_the_nodes_whatever_partition_it_claims() -> None:
    rp = RoundPrivacy(_cfg("remote"))
    rp.check_ledgers([_reply(7, 0, 3.0, 10)])
    kept, rejected = rp.check_ledgers([_reply(7, 2, 1.0, 20)])  # same node, other partition id
    assert kept == [] and list(rejected) == [7]
    assert rp.ledgers == {"node 7": (3.0, 10)}


def test_ledger_floor_and_reported_epsilon_survive_a_checkpoint(tmp_path: Path) -> None:
    cfg = _cfg()
    rp = RoundPrivacy(cfg)
    rp.check_ledgers([_reply(7, 0, 3.24, 30)])
    rp.round_metrics(3, [{"node_id": 7, "partition-id": 0, "dp-epsilon": 3.24, "dp-delta": 1e-3}], [])
    rp.exhausted.add(1)
    save_checkpoint(checkpoint_path(tmp_path), make_checkpoint(
        3, {"w": np.zeros(2, np.float32)}, None, History(), mlflow_run_id="r", cfg=cfg,
        hooks=[rp.state_hook()]))
    resumed = RoundPrivacy(cfg)
    restore_hooks(load_checkpoint(checkpoint_path(tmp_path)), [resumed.state_hook()])
    assert resumed.ledgers == {"partition 0": (3.24, 30)}
    assert resumed.exhausted == {1}
    # the next round's figure from a client not seen since does not lower the max
    metrics = resumed.round_metrics(4, [{"node_id": 9, "partition-id": 2, "dp-epsilon": 2.81, "dp-delta": 1e-3}], [])
    assert metrics["dp_epsilon_sample_max"] == 3.24
    assert resumed.check_ledgers([_reply(7, 0, 2.81, 20)])[0] == []


@pytest.mark.e2e
def test_a_deleted_client_ledger_is_rejected_after_a_resume_and_epsilon_never_drops(tmp_path: Path) -> None:
    """The issue's case on the real engine: after round 1, client 0's privacy.json is
    deleted and the server restarted; round 2 rejects client 0's update, and the run's
    reported epsilon continues from round 1 instead of dropping."""
    import csv
    import dataclasses

    from fedslm.simulations.launch import run_on_simulation

    out = tmp_path / "run"
    cfg = ExperimentConfig.from_dict({
        "federation": on_test_ray({"num_clients": 2, "num_rounds": 1, "round_timeout": 120.0,
                                   "initial_evaluation": False}),
        "training": {"local_steps": 3, "eval_max_batches": 1, "central_eval": False},
        "privacy": {"mode": "dp_sgd", "noise_multiplier": 1.0},
        "tracking": {"enabled": False}, "output_dir": str(out)})
    first = run_on_simulation(cfg)
    eps1 = first["rounds"][-1]["dp_epsilon_sample_max"]
    (out / "clients" / "0" / "privacy.json").unlink()
    resumed = dataclasses.replace(cfg, federation=dataclasses.replace(
        cfg.federation, num_rounds=2, resume_from=str(out)))
    second = run_on_simulation(resumed)
    assert second["rounds"][-1]["dp_epsilon_sample_max"] >= eps1
    with open(out / "clients.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["round"] == "2" and r["phase"] == "train"]
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["error"].startswith(
        "privacy ledger: went backwards: epsilon ")
    assert second["rounds"][-1]["clients_rejected"] == 1.0
