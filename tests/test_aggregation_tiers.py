"""Ranks by device tier (``peft.ranks="tier=small r=2, * r=4"``): the spec, what a client
reports of its node config's tier, the server's decision from it, and ranks that survive a
checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedslm.adapters import from_array_record, to_array_record
from fedslm.aggregation.lora_factors import rank_of
from fedslm.aggregation.ranks import RankSpecError, assign_ranks, parse_ranks, rank_for_tier, tier_index, tier_metrics
from fedslm.client.agent import AgentConfig, parse_args, write_node_config
from fedslm.config import ConfigError, ExperimentConfig
from fedslm.replies import metric_problem
from fedslm.server.checkpoint import load_checkpoint, make_checkpoint, restore_hooks, save_checkpoint
from fedslm.server.lora_aggregation import LoraAggregation, rank_state_hook, with_aggregation
from fedslm.server.rounds import History
from tests import fakes

SPEC = "tier=small r=2, tier=large r=8, * r=4"


def test_tier_spec_parses_and_maps_tiers_to_ranks() -> None:
    spec = parse_ranks(SPEC)
    assert spec.tiers == (("small", 2), ("large", 8)) and spec.by_tier and not spec.by_partition
    assert spec.ranks == (2, 4, 8)
    assert [tier_index(t, spec) for t in ("small", "large", "medium", None, 3)] == [0, 1, -1, -1, -1]
    assert [rank_for_tier(i, spec) for i in (0, 1, -1, None)] == [2, 8, 4, 2]  # None: not heard yet
    assert rank_for_tier(-1, parse_ranks("tier=a r=3, tier=b r=5")) == 3  # no '*': the smallest
    assert assign_ranks(spec, [7, 8, 9], default_rank=8, tiers={7: 1, 8: -1}) == {7: 8, 8: 4, 9: 2}


@pytest.mark.parametrize(
    "bad, why",
    [
        ("tier=a r=2, 0-3 r=4", "mixes tiers ('tier=NAME r=R') and partition ids"),
        ("tier=a r=2, 50% r=4, 50% r=8", "mixes shares"),
        ("tier=a r=2, tier=a r=4", "tier 'a' is named twice"),
        ("tier=a b r=2", "expected 'P% r=R', 'FIRST-LAST r=R', 'tier=NAME r=R' or '* r=R'"),
    ],
)
def test_bad_tier_specs_name_the_problem(bad, why) -> None:
    import re

    with pytest.raises(RankSpecError, match=re.escape(why)):
        parse_ranks(bad)
    with pytest.raises(ConfigError, match=r"^peft.ranks: "):
        ExperimentConfig.from_dict({"peft": {"ranks": bad}})


def test_a_client_reports_its_tier_as_a_metric_the_server_accepts() -> None:
    assert tier_metrics(SPEC, {"tier": "large", "partition-id": 0}) == {"tier-index": 1}
    assert tier_metrics(SPEC, {}) == {"tier-index": -1}
    assert tier_metrics("0-1 r=2, * r=4", {"tier": "large"}) == {}  # not by tier: nothing reported
    assert metric_problem("tier-index", 1) is None and metric_problem("tier-index", -1) is None
    assert metric_problem("tier-index", -2) is not None and metric_problem("tier-index", 1.0) is not None


def test_the_agent_writes_its_tier_into_the_node_config(tmp_path) -> None:
    import tomllib

    def agent(**tier: str) -> AgentConfig:
        paths = dict(root_certificates=tmp_path / "ca", auth_key=tmp_path / "k", data_path=tmp_path)
        return AgentConfig(superlink="h:1", state_dir=tmp_path, **paths, **tier)  # type: ignore[arg-type]

    assert tomllib.loads(write_node_config(agent(tier="small")).read_text())["tier"] == "small"
    assert "tier" not in tomllib.loads(write_node_config(agent()).read_text())
    with pytest.raises(SystemExit):
        parse_args(
            [
                "--superlink",
                "h:1",
                "--root-certificates",
                "c",
                "--auth-key",
                "k",
                "--data-path",
                "d",
                "--state-dir",
                "s",
                "--tier",
                "big one",
            ]
        )


@pytest.fixture
def in_a_serverapp(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _factors(rank: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rank)
    return {
        "m.q.lora_A.weight": rng.standard_normal((rank, 5)).astype(np.float32),
        "m.q.lora_B.weight": rng.standard_normal((6, rank)).astype(np.float32),
    }


def _cfg(tmp_path) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {"federation": {"num_clients": 3}, "peft": {"r": 8, "ranks": SPEC}, "output_dir": str(tmp_path)}
    )


def _strategy(tmp_path) -> LoraAggregation:
    cfg = _cfg(tmp_path)
    strategy = with_aggregation(cfg, FedAvg(fraction_evaluate=1.0, min_available_nodes=3, min_train_nodes=3))
    assert isinstance(strategy, LoraAggregation)
    return strategy


def _evaluate_reply(node: int, tier_index_: int) -> Message:
    return fakes.reply(
        node,
        RecordDict({"metrics": MetricRecord({"num-examples": 5, "loss": 1.0, "tier-index": tier_index_})}),
        kind="evaluate",
    )


def test_the_server_sends_each_node_its_tiers_rank_and_checkpoints_it(tmp_path, in_a_serverapp) -> None:
    strategy = _strategy(tmp_path)
    strategy.aggregate_evaluate(0, [_evaluate_reply(1, 0), _evaluate_reply(2, 1), _evaluate_reply(3, -1)])
    messages = strategy.configure_train(1, to_array_record(_factors(8)), ConfigRecord(), fakes.NodesGrid(3))
    got = {m.metadata.dst_node_id: rank_of(from_array_record(m.content["arrays"])) for m in messages}
    assert got == {1: 2, 2: 8, 3: 4}
    hook = rank_state_hook(strategy)
    assert hook is not None and rank_state_hook(FedAvg()) is None
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(
        path, make_checkpoint(1, _factors(8), strategy, History(), mlflow_run_id="r", cfg=_cfg(tmp_path), hooks=[hook])
    )
    fresh = _strategy(tmp_path)
    restore_hooks(load_checkpoint(path), [rank_state_hook(fresh)])  # type: ignore[list-item]
    assert fresh.node_rank == {1: 2, 2: 8, 3: 4} and fresh.tiers == {1: 0, 2: 1, 3: -1}
    again = fresh.configure_train(2, to_array_record(_factors(8)), ConfigRecord(), fakes.NodesGrid(3))
    assert {m.metadata.dst_node_id: rank_of(from_array_record(m.content["arrays"])) for m in again} == got


def test_bounding_keeps_the_partition_and_tier_the_lora_wrapper_learns_ranks_from() -> None:
    """The round loop rebuilds train replies before aggregation; the LoRA wrapper must still
    see each node's tier (a node that is only ever trained, never evaluated, learns it here)."""
    from fedslm.config import RobustConfig
    from fedslm.server.screening import bound_influence

    sent = to_array_record(_factors(8))
    reply = fakes.train_reply(5, _factors(8), **{"tier-index": 1, "partition-id": 3, "loss": 1.0})
    bounded = bound_influence([reply], {5: sent}, RobustConfig())
    kept = bounded.replies[0].content["metrics"]
    assert kept["tier-index"] == 1 and kept["partition-id"] == 3 and "loss" not in kept
