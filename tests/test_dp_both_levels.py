"""privacy.mode=dp_sgd+dp_fedavg: clients' DP-SGD ledgers and the server's DP-FedAvg
ledger both advance, both are reported each round, and either budget stops what it covers.

Hand-built replies and Flower's real strategy wrapper (as tests/test_dp_fedavg.py); the
references are dp-accounting's RDP accountant for the server's releases.
"""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from fedslm.config import ExperimentConfig
from fedslm.server.dp_fedavg import UserLevelDp
from fedslm.server.privacy import Release
from fedslm.server.privacy_rounds import setup_privacy
from fedslm.server.strategy import build_strategy
from fedslm.simulations.report import privacy_line
from tests.test_dp_fedavg import FakeGrid, _arrays, _reference, _refusal, _reply, _update, run_identity  # noqa: F401

CLIENT_NOISE, SERVER_NOISE = 0.75, 1.1  # 0.75: the mean of three is exact


def _cfg(**privacy) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "federation": {"num_clients": 10},
        "strategy": {"fraction_train": 0.3, "min_train_clients": 2},
        "privacy": {"mode": "dp_sgd+dp_fedavg", "noise_multiplier": CLIENT_NOISE,
                    "user_noise_multiplier": SERVER_NOISE, "clipping_norm": 1.0, "delta": 1e-5,
                    **privacy}})


def _train_round(strategy, privacy, rnd: int, client_eps: list[float], *, steps: int = 10):
    """One round of three DP-SGD clients through the DP-FedAvg wrapper; the loop's order:
    refusals split off, ledgers checked, aggregate, round metrics."""
    current = _arrays(0.0)
    messages = list(strategy.configure_train(rnd, current, ConfigRecord(), FakeGrid(10)))
    base = [a.numpy() for a in current.values()]
    replies = [_reply(i + 1, _arrays([b + u for b, u in zip(base, _update(0.5, rnd * 10 + i))]),
                      **{"partition-id": i, "dp-epsilon": e, "dp-delta": 1e-3, "dp-steps": steps,
                         "dp-steps-total": rnd * steps, "dp-noise-multiplier": CLIENT_NOISE,
                         "dp-clipped-fraction": 0.5})
               for i, e in enumerate(client_eps)]
    kept, refused = privacy.split_refusals(replies)
    kept, rejected = privacy.check_ledgers(kept)
    assert rejected == {}
    strategy.aggregate_train(rnd, kept)
    rows = [{"node_id": m.metadata.src_node_id, **m.content["metrics"]} for m in kept]
    return messages, privacy.round_metrics(rnd, rows, refused)


def test_both_ledgers_advance_and_both_are_reported_each_round(tmp_path):
    cfg = _cfg()
    strategy, privacy = setup_privacy(cfg, build_strategy(cfg), tmp_path)
    assert isinstance(strategy, UserLevelDp) and strategy.state.noise_multiplier == SERVER_NOISE
    reported = []
    for rnd, eps in ((1, [0.5, 0.6, 0.7]), (2, [0.9, 1.0, 1.2])):
        messages, metrics = _train_round(strategy, privacy, rnd, eps)
        assert len(messages) == 3
        reported.append(metrics)
    first, second = reported
    for rnd, metrics in ((1, first), (2, second)):
        assert metrics["dp_epsilon_user"] == pytest.approx(_reference([(SERVER_NOISE, 3, 10)] * rnd, 1e-5), abs=1e-6)
        assert metrics["dp_noise_multiplier"] == SERVER_NOISE and metrics["dp_delta"] == 1e-5
        assert metrics["dp_noise_multiplier_sample"] == CLIENT_NOISE and metrics["dp_delta_sample"] == 1e-3
        assert metrics["dp_clip_norm_sample"] == cfg.privacy.max_grad_norm and metrics["dp_clip_norm"] == 1.0
        assert metrics["dp_clipped_fraction_sample"] == 0.5
    assert (first["dp_epsilon_sample_max"], second["dp_epsilon_sample_max"]) == (0.7, 1.2)
    assert second["dp_epsilon_user"] > first["dp_epsilon_user"]
    assert privacy.ledgers["partition 2"] == (1.2, 20)  # the clients' floors advanced too
    summary = privacy.summary()
    assert (summary["epsilon_sample_max"], summary["delta_sample"], summary["delta"]) == (1.2, 1e-3, 1e-5)
    assert privacy_line(summary) == (
        f"sample-level epsilon 1.2 at delta <= 0.001 (per record, max over clients); user-level "
        f"epsilon {summary['epsilon_user']:.3g} at delta 1e-05 (whole client contribution, 2 releases)")


def test_the_servers_budget_stops_the_run(tmp_path):
    cfg = _cfg(max_epsilon=6.0)
    strategy, privacy = setup_privacy(cfg, build_strategy(cfg), tmp_path)
    rounds = 0
    for rnd in range(1, 20):
        if privacy.stop_reason(rnd):
            break
        _train_round(strategy, privacy, rnd, [0.1, 0.1, 0.1])  # clients far from their budget
        rounds += 1
    assert strategy.state.epsilon() <= 6.0 < strategy.state.epsilon(Release(rounds + 1, SERVER_NOISE, 3, 10))
    assert privacy.stopped.startswith(f"privacy budget exhausted: round {rounds + 1} would take user-level")
    assert list(strategy.configure_train(rounds + 1, _arrays(0.0), ConfigRecord(), FakeGrid(10))) == []


def test_a_client_at_its_budget_refuses_and_too_few_left_stops_the_run(tmp_path):
    cfg = _cfg(max_epsilon=50.0)  # the server's ledger is far from it
    strategy, privacy = setup_privacy(cfg, build_strategy(cfg), tmp_path)
    _train_round(strategy, privacy, 1, [1.0, 1.0, 1.0])
    kept, refused = privacy.split_refusals([_refusal(9, 4, 49.9)])
    assert kept == [] and len(refused) == 1
    metrics = privacy.round_metrics(2, [], refused)
    assert metrics["dp_clients_refused"] == 1.0 and metrics["dp_epsilon_sample_max"] == 49.9
    assert "dp_epsilon_user" in metrics  # reported in a round that released nothing too
    assert privacy.stop_reason(2) is None  # 9 of 10 clients left
    privacy.split_refusals([_refusal(20 + i, 5 + i, 50.0) for i in range(8)])
    assert privacy.stop_reason(3) == ("privacy budget exhausted: 9 of 10 clients reached "
                                      "privacy.max_epsilon=50; 1 left, strategy.min_train_clients=2")


def test_the_servers_noise_is_its_own_setting(tmp_path):
    cfg = _cfg(clipping="adaptive", clipped_count_stddev=1.0, user_noise_multiplier=0.5)
    assert (cfg.privacy.user_level_noise(), cfg.privacy.noise_multiplier) == (0.5, CLIENT_NOISE)
    assert cfg.privacy.accountant_name() == "prv"  # the clients'; the server's is rdp
    strategy, _ = setup_privacy(cfg, build_strategy(cfg), tmp_path)
    assert (strategy.state.noise_multiplier, strategy.state.accountant) == (0.5, "rdp")


def test_epsilon_spent_at_evaluation_is_reported(tmp_path):
    """finetune under DP-SGD fine-tunes at evaluation: the evaluate replies' ledgers raise
    the run's sample-level epsilon (the final summary included), never lower it."""
    cfg = ExperimentConfig.from_dict({"federation": {"num_clients": 4},
                                      "personalization": {"method": "finetune"},
                                      "privacy": {"mode": "dp_sgd"}})
    _, privacy = setup_privacy(cfg, build_strategy(cfg), tmp_path)
    privacy.round_metrics(1, [{"node_id": 1, "dp-epsilon": 2.0, "dp-delta": 1e-3},
                              {"node_id": 2, "dp-epsilon": 3.0, "dp-delta": 1e-3}], [])
    rows = [{"node_id": 1, "status": "ok", "dp-epsilon": 2.5, "dp-delta": 1e-3, "dp-finetune-refused": 0},
            {"node_id": 2, "status": "ok", "dp-epsilon": 3.0, "dp-delta": 1e-3, "dp-finetune-refused": 1},
            {"node_id": 3, "status": "rejected", "dp-epsilon": 99.0}]
    assert privacy.evaluate_metrics(rows) == {"dp_epsilon_sample_max": 3.0, "dp_epsilon_sample_mean": 2.75,
                                              "dp_finetunes_refused": 1.0}
    assert privacy.evaluate_metrics([{"node_id": 2, "status": "ok", "dp-epsilon": 1.0}])["dp_epsilon_sample_max"] == 3.0
    assert privacy.summary()["epsilon_sample_max"] == 3.0
    assert privacy.evaluate_metrics([{"node_id": 1, "status": "ok", "loss": 2.0}]) == {}
