"""Resume with per-client ranks: a run checkpointed after a round with ``peft.ranks``
(partition-id pattern, shares or tiers) and resumed through ``resume_state`` sends every
node the same rank, the same exact slice of the same global and keeps the wrapped
strategy's state, as the run that never stopped would have."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedslm.adapters import from_array_record, to_array_record
from fedslm.aggregation.lora_factors import rank_of
from fedslm.config import ConfigError, ExperimentConfig
from fedslm.server.checkpoint import checkpoint_path, make_checkpoint, resume_state, save_checkpoint
from fedslm.server.lora_aggregation import LoraAggregation, rank_state_hook, with_aggregation
from fedslm.server.rounds import History
from fedslm.server.strategy import build_strategy
from tests import fakes

NODES = (11, 12, 13, 14, 15)  # partition ids 0..4, in that order
TIERS = ("small", None, "large", "small", "medium")  # what each node's config names


@pytest.fixture
def in_a_serverapp(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _factors(rank: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "m.q.lora_A.weight": rng.standard_normal((rank, 5)).astype(np.float32),
        "m.q.lora_B.weight": rng.standard_normal((6, rank)).astype(np.float32),
    }


def _cfg(run_dir, ranks: str, **over: dict) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "federation": {"num_clients": len(NODES)},
            "peft": {"r": 8, "ranks": ranks},
            "strategy": {"min_train_clients": len(NODES), "min_evaluate_clients": len(NODES)},
            "output_dir": str(run_dir),
            **over,
        }
    )


def _metrics(i: int, ranks: str) -> dict[str, int]:
    from fedslm.aggregation.ranks import tier_metrics

    node_config = {"partition-id": i} | ({"tier": TIERS[i]} if TIERS[i] else {})
    return {"partition-id": i, **tier_metrics(ranks, node_config)}


def _sent(messages: list[Message]) -> dict[int, dict[str, np.ndarray]]:
    return {m.metadata.dst_node_id: from_array_record(m.content["arrays"]) for m in messages}


def _one_round(strategy, rnd: int, global_: dict[str, np.ndarray], ranks: str):
    """configure_train, then every node returns its own slice moved by a seeded step."""
    sent = _sent(list(strategy.configure_train(rnd, to_array_record(global_), ConfigRecord(), fakes.NodesGrid(NODES))))
    replies = []
    for i, node in enumerate(NODES):
        step = _factors(rank_of(sent[node]), seed=100 * rnd + node)
        moved = {k: v + np.float32(0.1) * step[k] for k, v in sent[node].items()}
        replies.append(fakes.train_reply(node, moved, num_examples=10 + i, **_metrics(i, ranks)))
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return sent, from_array_record(arrays)


@pytest.mark.parametrize(
    "ranks, rule, strategy_name, expected",
    [
        # by partition id; FedAvgM around the HetLoRA padding (its momentum must survive too)
        ("0-1 r=2, 4 r=4, * r=8", "fedavg", "fedavgm", {11: 2, 12: 2, 13: 8, 14: 8, 15: 4}),
        # by share of the node ids seen (largest remainder), product-space rule
        ("40% r=2, 40% r=4, 20% r=8", "flexlora", "fedavg", {11: 2, 12: 2, 13: 4, 14: 4, 15: 8}),
        # by device tier; a tier the spec does not name, or none, gets '*'
        ("tier=small r=2, tier=large r=8, * r=4", "flora", "fedprox", {11: 2, 12: 4, 13: 8, 14: 2, 15: 4}),
    ],
)
def test_a_resumed_run_sends_every_node_its_rank_and_the_saved_global(
    tmp_path, in_a_serverapp, ranks, rule, strategy_name, expected
) -> None:
    over = {
        "aggregation": {"name": rule},
        "strategy": {"name": strategy_name, "min_train_clients": 5, "min_evaluate_clients": 5},
    }
    cfg = _cfg(tmp_path / "run", ranks, **over)
    strategy = with_aggregation(cfg, build_strategy(cfg))
    assert isinstance(strategy, LoraAggregation)
    # round 0: every node's evaluation reply tells the server its partition id / tier
    strategy.aggregate_evaluate(
        0,
        [
            fakes.reply(
                n,
                RecordDict({"metrics": MetricRecord({"num-examples": 5, "loss": 1.0, **_metrics(i, ranks)})}),
                kind="evaluate",
            )
            for i, n in enumerate(NODES)
        ],
    )
    sent1, global1 = _one_round(strategy, 1, _factors(8, 0), ranks)
    assert {n: rank_of(a) for n, a in sent1.items()} == expected
    hook = rank_state_hook(strategy)
    assert hook is not None
    save_checkpoint(
        checkpoint_path(tmp_path / "run"),
        make_checkpoint(1, global1, strategy, History(), mlflow_run_id="r", cfg=cfg, hooks=[hook]),
    )

    momentum = [m.copy() for m in getattr(strategy.strategy, "momentum_vector", None) or []]
    assert bool(momentum) == (strategy_name == "fedavgm")
    # the run that never stopped: round 2
    sent2, global2 = _one_round(strategy, 2, global1, ranks)

    # a new server process: fresh strategy from the same config, resumed
    resumed_cfg = dataclasses.replace(
        cfg, federation=dataclasses.replace(cfg.federation, resume_from=str(tmp_path / "run"))
    )
    fresh = with_aggregation(resumed_cfg, build_strategy(resumed_cfg))
    assert isinstance(fresh, LoraAggregation) and fresh.node_rank == {}
    ckpt = resume_state(resumed_cfg, fresh, [rank_state_hook(fresh)])  # type: ignore[list-item]
    assert ckpt is not None and ckpt.round == 1
    assert fresh.node_rank == expected
    assert fresh.partitions == {n: i for i, n in enumerate(NODES)}
    for key, value in global1.items():  # the global state, bit for bit
        np.testing.assert_array_equal(ckpt.arrays[key], value)
    if momentum:  # the wrapped strategy's momentum crossed the restart
        assert len(fresh.strategy.momentum_vector) == len(momentum)
        for a, b in zip(fresh.strategy.momentum_vector, momentum):
            np.testing.assert_array_equal(a, b)

    resent2, reglobal2 = _one_round(fresh, 2, ckpt.arrays, ranks)
    assert {n: rank_of(a) for n, a in resent2.items()} == expected
    for node, arrays in sent2.items():  # exact shapes and values each node was sent
        assert {k: v.shape for k, v in resent2[node].items()} == {k: v.shape for k, v in arrays.items()}
        for key, value in arrays.items():
            np.testing.assert_array_equal(resent2[node][key], value)
    for key, value in global2.items():  # and the same next global
        np.testing.assert_allclose(reglobal2[key], value, rtol=0, atol=1e-6)


def test_a_checkpoint_made_without_ranks_is_refused_for_a_run_with_ranks(tmp_path, in_a_serverapp) -> None:
    plain = _cfg(tmp_path / "run", "")
    save_checkpoint(
        checkpoint_path(tmp_path / "run"),
        make_checkpoint(1, _factors(8, 0), build_strategy(plain), History(), mlflow_run_id="r", cfg=plain, hooks=[]),
    )
    cfg = _cfg(tmp_path / "other", "0-1 r=2, * r=8")
    resumed = dataclasses.replace(
        cfg, federation=dataclasses.replace(cfg.federation, resume_from=str(tmp_path / "run"))
    )
    strategy = with_aggregation(resumed, build_strategy(resumed))
    with pytest.raises(ConfigError, match=r"^federation.resume_from: the checkpoint was made with peft.ranks=''"):
        resume_state(resumed, strategy, [rank_state_hook(strategy)])  # type: ignore[list-item]
