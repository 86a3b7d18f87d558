"""DP-FedAvg with every aggregation rule and with mixed ranks, on hand-built factors: what is
clipped is what the rule aggregates (factor deltas for fedavg/ffa, product deltas for
flora/flexlora), the clip bound holds, the noise has the stated spread z*C/m, and with no
clip and no noise each release is the rule's own aggregate at equal weights."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedslm.adapters import from_array_record, to_array_record
from fedslm.aggregation import fedavg, flexlora, flora
from fedslm.aggregation.lora_factors import pad, product, truncate
from fedslm.aggregation.private import clip, factor_delta, l2_norm, noised_mean, private_aggregate, product_delta
from fedslm.config import ExperimentConfig
from fedslm.server.dp_fedavg import UserLevelDp
from fedslm.server.lora_aggregation import LoraAggregation, with_aggregation
from fedslm.server.privacy_rounds import setup_privacy
from fedslm.server.strategy import build_strategy
from tests import fakes

A, B = "m.q.lora_A.weight", "m.q.lora_B.weight"
A2, B2 = "m.v.lora_A.weight", "m.v.lora_B.weight"


def _factors(rank: int, seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        A: (scale * rng.standard_normal((rank, 5))).astype(np.float32),
        B: (scale * rng.standard_normal((6, rank))).astype(np.float32),
        A2: (scale * rng.standard_normal((rank, 4))).astype(np.float32),
        B2: (scale * rng.standard_normal((3, rank))).astype(np.float32),
    }


def _moved(sent: dict[str, np.ndarray], seed: int, step: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + step * rng.standard_normal(v.shape)).astype(np.float32) for k, v in sent.items()}


def _prod(arrays, a=A, b=B):
    return product(arrays[b], arrays[a])


@pytest.mark.parametrize("rule", [flexlora, flora])
def test_no_clip_no_noise_is_the_product_rule_at_equal_weights(rule) -> None:
    glob = _factors(4, 0)
    replies = [_moved(glob, s, 0.3) for s in (1, 2, 3)]
    out, residual, _ = private_aggregate(
        replies,
        [glob] * 3,
        product_space=True,
        rank=4,
        clip_norm=1e9,
        noise_multiplier=0.0,
        rng=np.random.default_rng(0),
    )
    expected, expected_residual = rule.aggregate(replies, [1, 1, 1], rank=4)
    for a, b in ((A, B), (A2, B2)):
        np.testing.assert_allclose(_prod(out, a, b), _prod(expected, a, b), atol=1e-5)
    assert residual == pytest.approx(expected_residual, abs=1e-6)


def test_no_clip_no_noise_with_mixed_ranks_is_hetlora_fedavg_at_equal_weights() -> None:
    glob = _factors(4, 0)
    sent = [truncate(glob, 2), glob, truncate(glob, 1)]
    replies = [_moved(s, i, 0.2) for i, s in enumerate(sent)]
    out, _, norms = private_aggregate(
        replies, sent, product_space=False, rank=4, clip_norm=1e9, noise_multiplier=0.0, rng=np.random.default_rng(0)
    )
    expected = fedavg.aggregate(replies, [1, 1, 1], rank=4)
    for name in glob:
        np.testing.assert_allclose(out[name], expected[name], atol=1e-6)
    # a rank-r client's padded delta has exactly the norm of its own delta
    assert norms[0] == pytest.approx(
        l2_norm({k: replies[0][k].astype(np.float64) - sent[0][k] for k in sent[0]}), rel=1e-12
    )


def test_product_rules_clip_the_product_delta_not_the_factors() -> None:
    glob = _factors(2, 0)
    big, small = _moved(glob, 1, 3.0), _moved(glob, 2, 0.01)
    d_big, d_small = product_delta(big, glob), product_delta(small, glob)
    assert l2_norm(d_big) > 1.0 > l2_norm(d_small)
    clipped, norm = clip(d_big, 1.0)
    assert norm == pytest.approx(l2_norm(d_big)) and l2_norm(clipped) == pytest.approx(1.0, rel=1e-12)
    kept = clip(d_small, 1.0)[0]
    assert all(np.array_equal(kept[k], d_small[k]) for k in d_small)
    mean, norms = noised_mean([d_big, d_small], clip_norm=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0))
    for name in d_big:
        np.testing.assert_allclose(mean[name], (d_big[name] / norms[0] + d_small[name]) / 2, atol=1e-12)
    # the factor delta of the same reply is another vector with another norm
    assert l2_norm(factor_delta(big, glob, 2)) != pytest.approx(l2_norm(d_big), rel=1e-3)


@pytest.mark.parametrize("product_space", [True, False])
def test_one_client_moves_the_release_by_at_most_2c_over_m(product_space) -> None:
    """Sensitivity: replacing one client's data by anything moves the pre-noise mean by <= 2C/m."""
    glob, c, m = _factors(3, 0), 0.5, 4
    replies = [_moved(glob, s, 0.5) for s in range(m)]
    delta = product_delta if product_space else (lambda r, s: factor_delta(r, s, 3))
    rng = np.random.default_rng(0)
    before, _ = noised_mean([delta(r, glob) for r in replies], clip_norm=c, noise_multiplier=0.0, rng=rng)
    for seed, step in ((10, 100.0), (11, 0.0), (12, 7.0)):
        swapped = replies[:-1] + [_moved(glob, seed, step)]
        after, _ = noised_mean([delta(r, glob) for r in swapped], clip_norm=c, noise_multiplier=0.0, rng=rng)
        moved = l2_norm({k: after[k] - before[k] for k in before})
        assert moved <= 2 * c / m + 1e-12


def test_noise_is_z_c_over_m_per_coordinate_drawn_from_the_given_rng() -> None:
    zeros = [{"p": np.zeros((64, 64)), "q": np.zeros((32, 64))}] * 4
    z, c = 2.0, 0.5
    mean, _ = noised_mean(zeros, clip_norm=c, noise_multiplier=z, rng=np.random.default_rng(7))
    std = z * c / 4
    rng = np.random.default_rng(7)  # exact: tensor by tensor, in order
    np.testing.assert_array_equal(mean["p"], rng.normal(0.0, std, (64, 64)))
    np.testing.assert_array_equal(mean["q"], rng.normal(0.0, std, (32, 64)))
    values = np.concatenate([mean["p"].ravel(), mean["q"].ravel()])  # 6,144 draws
    assert float(values.std()) == pytest.approx(std, rel=0.03)
    assert abs(float(values.mean())) < 4 * std / np.sqrt(values.size)


# --- on the server: DP-FedAvg around the LoRA wrapper ------------------------------------------


@pytest.fixture
def in_a_serverapp(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _cfg(**extra) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "federation": {"num_clients": 3},
            "strategy": {"min_train_clients": 3},
            "privacy": {"mode": "dp_fedavg", "noise_multiplier": 0.0, "clipping_norm": 0.5, "delta": 1e-3},
            **extra,
        }
    )


def _reply(to: Message, arrays: dict[str, np.ndarray], n: int) -> Message:
    reply = Message(
        RecordDict({"arrays": to_array_record(arrays), "metrics": MetricRecord({"num-examples": n, "loss": float(n)})}),
        reply_to=to,
    )
    reply.metadata.__dict__["_src_node_id"] = to.metadata.dst_node_id
    return reply


@pytest.mark.parametrize("name, ranks", [("flexlora", ""), ("flora", "1 r=1, * r=4"), ("fedavg", "50% r=2, 50% r=4")])
def test_user_level_dp_releases_what_the_rule_aggregates(tmp_path, in_a_serverapp, name, ranks) -> None:
    cfg = _cfg(aggregation={"name": name}, peft={"r": 4, "ranks": ranks})
    strategy, privacy = setup_privacy(cfg, with_aggregation(cfg, build_strategy(cfg)), tmp_path)
    assert isinstance(strategy, UserLevelDp) and isinstance(strategy.strategy, LoraAggregation)
    strategy.strategy.partitions = {1: 0, 2: 1, 3: 2}
    glob = _factors(4, 0)
    messages = list(strategy.configure_train(1, to_array_record(glob), ConfigRecord(), fakes.NodesGrid(3)))
    sent = {m.metadata.dst_node_id: from_array_record(m.content["arrays"]) for m in messages}
    replies = [
        _reply(m, _moved(sent[m.metadata.dst_node_id], i, 2.0 if i == 0 else 0.05), 10**i)
        for i, m in enumerate(messages)
    ]  # node 1 far beyond the clip, example counts ignored
    order = [r.metadata.src_node_id for r in replies]
    expected, _, norms = private_aggregate(
        [from_array_record(r.content["arrays"]) for r in replies],
        [sent[n] for n in order],
        product_space=name != "fedavg",
        rank=4,
        clip_norm=0.5,
        noise_multiplier=0.0,
        rng=np.random.default_rng(0),
    )
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = from_array_record(arrays)
    for k in glob:
        np.testing.assert_allclose(out[k], expected[k], atol=1e-6)
    assert norms[0] > 0.5 and metrics["loss"] == pytest.approx(111 / 3)  # equal weights
    figures = privacy.round_metrics(1, [], [])
    assert figures["dp_clipped_fraction"] == pytest.approx(sum(n > 0.5 for n in norms) / 3)
    assert figures["dp_epsilon_user"] > 0 and len(strategy.state.releases) == 1
    assert strategy.aggregation_metrics["agg_rank_max"] == 4.0
    if ranks:
        assert {n: s[A].shape[0] for n, s in sent.items()} != {1: 4, 2: 4, 3: 4}


def test_product_noise_enters_the_dense_mean_before_the_svd(tmp_path, in_a_serverapp) -> None:
    """Equal replies, z > 0: the release is the SVD of (mean product + N(0, (zC/m)^2) dense)."""
    cfg = _cfg(
        aggregation={"name": "flexlora"},
        peft={"r": 4},
        privacy={"mode": "dp_fedavg", "noise_multiplier": 1.0, "clipping_norm": 0.5, "delta": 1e-3},
    )
    strategy, _ = setup_privacy(cfg, with_aggregation(cfg, build_strategy(cfg)), tmp_path)
    glob = _factors(4, 0)
    messages = list(strategy.configure_train(1, to_array_record(glob), ConfigRecord(), fakes.NodesGrid(3)))
    strategy._rng = np.random.default_rng(5)
    arrays, _ = strategy.aggregate_train(1, [_reply(m, glob, 1) for m in messages])
    out = from_array_record(arrays)
    rng = np.random.default_rng(5)
    std = 1.0 * 0.5 / 3
    dense = _prod(glob) + rng.normal(0.0, std, (6, 5))  # layer q's dense product is drawn first
    u, s, vt = np.linalg.svd(dense)
    np.testing.assert_allclose(_prod(out), (u[:, :4] * s[:4]) @ vt[:4], atol=1e-5)


def test_padding_a_reply_keeps_its_factor_norm() -> None:
    small = _factors(2, 3)
    assert l2_norm(pad(small, 4)) == pytest.approx(l2_norm(small))


def test_product_release_is_the_svd_of_the_sent_product_plus_the_clipped_mean_delta() -> None:
    glob = _factors(3, 0)
    sent = [glob, truncate(glob, 2), truncate(glob, 1)]
    replies = [_moved(s, i, 1.0 if i else 0.01) for i, s in enumerate(sent)]
    out, _, norms = private_aggregate(
        replies, sent, product_space=True, rank=3, clip_norm=0.2, noise_multiplier=0.0, rng=np.random.default_rng(0)
    )
    mean, expected_norms = noised_mean(
        [product_delta(r, s) for r, s in zip(replies, sent)], clip_norm=0.2, noise_multiplier=0.0, rng=None
    )
    assert norms == pytest.approx(expected_norms, rel=1e-12) and sum(n > 0.2 for n in norms) == 2
    for a, b in ((A, B), (A2, B2)):
        dense = sum(_prod(s, a, b) for s in sent) / 3 + mean[a]
        u, s, vt = np.linalg.svd(dense)
        np.testing.assert_allclose(_prod(out, a, b), (u[:, :3] * s[:3]) @ vt[:3], atol=1e-5)
