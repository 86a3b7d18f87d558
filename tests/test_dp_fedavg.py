"""User-level DP on the server: the DP-FedAvg wrapper on hand-built replies, its ledger,
restart continuation, adaptive clipping, and the loop's privacy bookkeeping."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedslm.config import ExperimentConfig
from fedslm.server.metrics import summarize
from fedslm.server.privacy import (
    PrivacyStateError,
    Release,
    load_server_privacy,
    restore_or_new,
    server_privacy_path,
    user_level_epsilon,
)
from fedslm.server.privacy_rounds import RoundPrivacy, setup_privacy
from fedslm.server.strategy import build_strategy
from tests import fakes

SHAPE = (50, 40)  # 2000 values per tensor, two tensors


@pytest.fixture(autouse=True)
def run_identity():
    """Messages the strategies construct read the run id of the process, as in a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


FakeGrid = fakes.NodesGrid


def _cfg(**privacy) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "federation": {"num_clients": 10},
        "strategy": {"fraction_train": 0.3, "min_train_clients": 2},
        "privacy": {"mode": "dp_fedavg", "noise_multiplier": 1.1, "clipping_norm": 1.0,
                    "delta": 1e-5, **privacy}})


def _arrays(value) -> ArrayRecord:
    return ArrayRecord({name: Array(np.full(SHAPE, value, np.float32) if np.isscalar(value) else value[i])
                        for i, name in enumerate(("a.lora_A.weight", "a.lora_B.weight"))})


def _reply(node: int, arrays: ArrayRecord, *, weight: int = 10, **metrics) -> Message:
    return fakes.train_reply(node, arrays, num_examples=weight, **metrics)


def _update(norm: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    parts = [rng.normal(size=SHAPE).astype(np.float64) for _ in range(2)]
    scale = norm / math.sqrt(sum(float((p ** 2).sum()) for p in parts))
    return [(p * scale).astype(np.float32) for p in parts]


def _round(strategy, rnd: int, current: ArrayRecord, updates: list[list[np.ndarray]], grid, **metrics):
    messages = list(strategy.configure_train(rnd, current, ConfigRecord(), grid))
    base = [a.numpy() for a in current.values()]
    replies = [_reply(i + 1, _arrays([b + u for b, u in zip(base, upd)]), **metrics)
               for i, upd in enumerate(updates)]
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return messages, arrays


def _reference(releases: list[tuple[float, int, int]], delta: float) -> float:
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for z, m, n in releases:
        acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(z / 2)))
    return acc.get_epsilon(delta)


# --- accounting ---------------------------------------------------------------------------


def test_user_level_epsilon_after_rounds_equals_the_reference(tmp_path):
    cfg = _cfg()
    strategy, privacy = setup_privacy(cfg, build_strategy(cfg), tmp_path)
    grid, current = FakeGrid(10), _arrays(0.0)
    for rnd in (1, 2, 3):
        messages, _ = _round(strategy, rnd, current, [_update(0.5, rnd * 10 + i) for i in range(3)], grid)
        assert len(messages) == 3  # int(10 * 0.3) of 10
    expected = _reference([(1.1, 3, 10)] * 3, 1e-5)
    assert strategy.state.epsilon() == pytest.approx(expected, abs=1e-6)
    assert privacy.round_metrics(3, [], [])["dp_epsilon_user"] == pytest.approx(expected, abs=1e-6)
    # Flower's own RDP accountant, configured for the same sampling and relation, agrees
    from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

    flower = RdpAccountant(PrivacyConfig(target_delta=1e-5, population_size=10,
                                         neighboring_relation=NeighboringRelation.REPLACE_ONE,
                                         sampling_method=SamplingMethod.WITHOUT_REPLACEMENT))
    flower.compose(GaussianPrivacyEvent(noise_multiplier=0.55, sample_size=3, population_size=10), count=3)
    assert flower.get_epsilon(1e-5) == pytest.approx(expected, abs=1e-6)


def test_pinned_user_level_epsilon():
    releases = [Release(r, 1.0, 3, 10) for r in range(1, 6)]
    assert user_level_epsilon(releases, delta=1e-5) == pytest.approx(22.037154194992198, abs=1e-6)
    # sampling amplifies: the same releases with everyone sampled cost more
    everyone = [Release(r, 1.0, 10, 10) for r in range(1, 6)]
    assert user_level_epsilon(everyone, delta=1e-5) == pytest.approx(30.12663110385034, abs=1e-6)
    assert user_level_epsilon([], delta=1e-5) == 0.0
    assert user_level_epsilon([Release(1, 0.0, 3, 10)], delta=1e-5) == math.inf


def test_server_ledger_survives_a_restart(tmp_path):
    cfg = _cfg()
    grid, current = FakeGrid(10), _arrays(0.0)
    updates = [[_update(0.5, r * 10 + i) for i in range(3)] for r in (1, 2, 3)]
    straight, _ = setup_privacy(cfg, build_strategy(cfg), tmp_path / "a")
    for rnd in (1, 2, 3):
        _round(straight, rnd, current, updates[rnd - 1], grid)
    first, _ = setup_privacy(cfg, build_strategy(cfg), tmp_path / "b")
    for rnd in (1, 2):
        _round(first, rnd, current, updates[rnd - 1], grid)
    del first  # the server process is gone; only the file is left
    saved = json.loads(server_privacy_path(tmp_path / "b").read_text())
    assert saved["rounds_done"] == 2 and len(saved["releases"]) == 2
    resumed, _ = setup_privacy(cfg, build_strategy(cfg), tmp_path / "b")
    assert resumed.state.epsilon() == pytest.approx(_reference([(1.1, 3, 10)] * 2, 1e-5), abs=1e-9)
    _round(resumed, 3, current, updates[2], grid)
    assert load_server_privacy(server_privacy_path(tmp_path / "b")) == load_server_privacy(
        server_privacy_path(tmp_path / "a"))
    assert resumed.state.epsilon() == straight.state.epsilon()


def test_unreadable_or_mismatched_state_is_an_error(tmp_path):
    path = server_privacy_path(tmp_path)
    path.write_text("[]")
    with pytest.raises(PrivacyStateError, match="unreadable privacy state"):
        restore_or_new(_cfg(), path)
    assert path.read_text() == "[]"
    cfg = _cfg()
    strategy, _ = setup_privacy(cfg, build_strategy(cfg), tmp_path / "x")
    _round(strategy, 1, _arrays(0.0), [_update(0.5, 1), _update(0.5, 2), _update(0.5, 3)], FakeGrid(10))
    with pytest.raises(PrivacyStateError, match="noise_multiplier=1.1"):
        restore_or_new(_cfg(noise_multiplier=2.0), server_privacy_path(tmp_path / "x"))


# --- the mechanism ------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["server", "client"])
def test_updates_are_clipped_and_weighted_equally(tmp_path, side):
    cfg = _cfg(noise_multiplier=0.0, clip_side=side)
    strategy, privacy = setup_privacy(cfg, build_strategy(cfg), tmp_path)
    current = _arrays(0.25)
    big, small = _update(40.0, 1), _update(0.3, 2)
    messages = list(strategy.configure_train(1, current, ConfigRecord(), FakeGrid(10)))
    if side == "client":  # the clipping norm travels in the train config, for Flower's mod
        assert messages[0].content["config"]["clipping_norm"] == 1.0
    replies = [_reply(1, _arrays([0.25 + u for u in big]), weight=1000),  # a client that did not clip
               _reply(2, _arrays([0.25 + u for u in small]), weight=1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    for i, name in enumerate(arrays.keys()):
        expected = 0.25 + (big[i] * (1.0 / 40.0) + small[i]) / 2  # clipped to 1.0, equal weights
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert privacy.round_metrics(1, [], [])["dp_clipped_fraction"] == 0.5
    assert all("dp-unit-weight" not in r.content["metrics"] for r in replies)


def test_an_unchanged_update_does_not_crash_the_round(tmp_path):
    cfg = _cfg(noise_multiplier=0.0)
    strategy, _ = setup_privacy(cfg, build_strategy(cfg), tmp_path)
    current = _arrays(0.5)
    _, arrays = _round(strategy, 1, current, [[np.zeros(SHAPE, np.float32)] * 2, _update(0.2, 3)], FakeGrid(10))
    assert arrays is not None


def test_noise_spread_is_z_c_over_m(tmp_path):
    cfg = _cfg(noise_multiplier=2.0, clipping_norm=0.5)
    strategy, privacy = setup_privacy(cfg, build_strategy(cfg), tmp_path)
    update = _update(0.2, 7)
    _, arrays = _round(strategy, 1, _arrays(0.0), [update] * 3, FakeGrid(10))
    residual = np.concatenate([(arrays[n].numpy() - update[i]).ravel() for i, n in enumerate(arrays.keys())])
    assert float(residual.std()) == pytest.approx(2.0 * 0.5 / 3, rel=0.05)
    assert privacy.round_metrics(1, [], [])["dp_noise_multiplier"] == 2.0


def test_noise_does_not_follow_the_public_seed(tmp_path):
    cfg = _cfg(noise_multiplier=1.0)
    results = []
    for run in range(2):
        np.random.seed(42)  # what the experiment does with training.seed
        strategy, _ = setup_privacy(cfg, build_strategy(cfg), tmp_path / str(run))
        random.seed(0)
        _, arrays = _round(strategy, 1, _arrays(0.0), [_update(0.2, 1)] * 3, FakeGrid(10))
        results.append(arrays["a.lora_A.weight"].numpy())
        assert np.random.get_state()[2] == np.random.RandomState(42).get_state()[2]  # restored
    assert not np.array_equal(results[0], results[1])


@pytest.mark.parametrize(("norm", "direction"), [(1.0, +1), (0.01, -1)])
def test_adaptive_clipping_moves_toward_the_update_norms(tmp_path, norm, direction):
    cfg = _cfg(noise_multiplier=0.0, clipping="adaptive", clipping_norm=0.1, clip_norm_lr=0.2)
    strategy, _ = setup_privacy(cfg, build_strategy(cfg), tmp_path)
    norms = [strategy.state.clipping_norm]
    for rnd in (1, 2, 3):
        _round(strategy, rnd, _arrays(0.0), [_update(norm, rnd * 3 + i) for i in range(3)], FakeGrid(10))
        norms.append(strategy.state.clipping_norm)
    steps = np.diff(norms) * direction
    assert (steps > 0).all()
    # all clipped (or none): the rule is exactly C <- C * exp(-lr * (unclipped - 0.5))
    assert norms[1] == pytest.approx(0.1 * math.exp(0.2 * 0.5 * direction))


def test_flower_adaptive_wrapper_still_moves_the_wrong_way():
    """Why UserLevelDp does its own adaptive step: when every update is larger than the
    clip, Flower's wrapper shrinks the clip further. If Flower fixes this, reconsider."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg

    flower = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), 0.0, 3, initial_clipping_norm=0.1)
    flower.current_arrays = _arrays(0.0)
    flower.aggregate_train(1, [_reply(i, _arrays(list(_update(1.0, i)))) for i in (1, 2, 3)])
    assert flower.clipping_norm < 0.1


# --- budget and the loop's bookkeeping --------------------------------------------------------


def test_server_stops_before_a_release_over_budget(tmp_path):
    cfg = _cfg(max_epsilon=6.0)
    strategy, privacy = setup_privacy(cfg, build_strategy(cfg), tmp_path)
    grid, rounds = FakeGrid(10), 0
    for rnd in range(1, 20):
        if privacy.stop_reason(rnd):
            break
        _round(strategy, rnd, _arrays(0.0), [_update(0.5, i) for i in range(3)], grid)
        rounds += 1
    assert strategy.state.epsilon() <= 6.0
    assert strategy.state.epsilon(Release(rounds + 1, 1.1, 3, 10)) > 6.0
    assert privacy.stopped.startswith(f"privacy budget exhausted: round {rounds + 1} would take")
    # and the wrapper itself refuses to configure such a round
    assert list(strategy.configure_train(rounds + 1, _arrays(0.0), ConfigRecord(), grid)) == []


def _refusal(node: int, pid: int, eps: float) -> Message:
    return fakes.reply(node, message_id=f"r{node}", content=RecordDict({
        "metrics": MetricRecord({"dp-budget-exhausted": 1, "dp-epsilon": eps, "dp-delta": 1e-3,
                                 "partition-id": pid}),
        "status": ConfigRecord({"status": "budget-exhausted", "message": "budget exhausted"})}))


def test_dp_sgd_refusals_are_counted_and_the_run_stops_when_too_few_remain():
    cfg = ExperimentConfig.from_dict({"federation": {"num_clients": 4},
                                      "strategy": {"min_train_clients": 2},
                                      "privacy": {"mode": "dp_sgd", "max_epsilon": 3.0}})
    privacy = RoundPrivacy(cfg)
    ok = [_reply(i, _arrays(0.0), **{"partition-id": i, "dp-epsilon": e, "dp-delta": 1e-3,
                                      "dp-noise-multiplier": 1.0, "dp-clipped-fraction": 0.25})
          for i, e in ((0, 1.0), (1, 2.0))]
    kept, refused = privacy.split_refusals([ok[0], _refusal(9, 2, 2.9), ok[1]])
    assert kept == [ok[0], ok[1]] and len(refused) == 1
    rows = [{"node_id": m.metadata.src_node_id, **m.content["metrics"]} for m in kept]
    metrics = privacy.round_metrics(1, rows, refused)
    assert metrics["dp_clients_refused"] == 1.0 and metrics["dp_clients_exhausted"] == 1.0
    assert metrics["dp_epsilon_sample_max"] == 2.9  # the refusing client's epsilon counts too
    assert metrics["dp_epsilon_sample_mean"] == pytest.approx((1.0 + 2.0 + 2.9) / 3)
    assert metrics["dp_clipped_fraction"] == 0.25 and metrics["dp_noise_multiplier"] == 1.0
    assert privacy.stop_reason(2) is None  # 3 of 4 still have budget
    privacy.split_refusals([_refusal(7, 0, 3.0), _refusal(8, 1, 3.0)])
    assert privacy.stop_reason(3) == ("privacy budget exhausted: 3 of 4 clients reached "
                                      "privacy.max_epsilon=3; 1 left, strategy.min_train_clients=2")
    # client dp figures are summarized by the privacy layer, not averaged by the generic one
    assert not any(k.startswith("train_dp") for k in summarize(rows, "train_"))
