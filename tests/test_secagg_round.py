"""SecAgg+ as the round loop's train phase: real server messaging and state machine,
real client stage functions behind a hand-built grid (no engine)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedslm.client import secagg as client
from fedslm.config import ExperimentConfig
from fedslm.secagg import protocol as P
from fedslm.server.dp_fedavg import UserLevelDp
from fedslm.server.privacy import Release, new_server_state, user_level_epsilon
from fedslm.server.rounds import RoundPlan, run_rounds
from fedslm.server.secagg_round import SecureTrain, capped_weights, distributed_release
from tests.secagg_util import entropy

DELTA = {1: 0.25, 2: -0.5, 3: 0.125, 4: 0.5}  # each node's update: the same value everywhere


def cfg(**sa) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "federation": {"num_clients": 4}, "strategy": {"min_train_clients": 2, "min_evaluate_clients": 2},
        "secure_aggregation": {"method": "secaggplus", "threshold": 3, "quantization_bits": 16, **sa}})


class Devices:
    """Nodes 1..4 run the real client stages; ``silent`` never answer the masked stage."""

    def __init__(self, config: ExperimentConfig, silent=(), claims=None) -> None:
        self.cfg, self.silent, self.outbox, self.states = config, set(silent), {}, {}
        self.claims = claims or dict.fromkeys(DELTA, 10)  # num-examples sent with the keys
        self.scales: dict[int, float] = {}
        self.received: list[Message] = []
        self.sent_inputs: dict[int, np.ndarray] = {}

    def get_node_ids(self):
        return [1, 2, 3, 4]

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg_id = f"{msg.metadata.group_id}-{msg.metadata.message_type}-{msg.metadata.dst_node_id}-{i}"
            msg.metadata.__dict__["_message_id"] = msg_id
            ids.append(msg_id)
            content = self.answer(msg)
            if content is None:
                continue
            reply = Message(content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            self.outbox[msg_id] = reply
        return ids

    def pull_messages(self, message_ids):
        got = [self.outbox.pop(i) for i in list(message_ids) if i in self.outbox]
        self.received += got
        return got

    def answer(self, msg: Message) -> RecordDict | None:
        node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        if kind == "evaluate":
            return RecordDict({"metrics": MetricRecord({"loss": 1.0, "num-examples": 1})})
        rec = msg.content[P.RECORD]
        rnd = int(rec[P.ROUND])
        if kind == P.MESSAGE_TYPES["keys"]:
            self.states[node], adv = client.advertise_keys(rnd, node, entropy=entropy(node, rnd))
            return RecordDict({P.RECORD: ConfigRecord({P.PK_ENC: adv["pk-enc"], P.PK_MASK: adv["pk-mask"],
                                                       P.COMMIT: adv["commit"]}),
                               "metrics": MetricRecord({"num-examples": self.claims[node], "partition-id": node})})
        state = self.states[node]
        if kind == P.MESSAGE_TYPES["shares"]:
            peers = {int(i): (e, m) for i, e, m in zip(rec[P.PEERS], rec[P.PK_ENC], rec[P.PK_MASK])}
            t = P.threshold(self.cfg.secure_aggregation, int(rec[P.NUM_SAMPLED]))
            cts = client.share_keys(state, peers, threshold=int(rec[P.THRESHOLD]), expected_threshold=t)
            return RecordDict({P.RECORD: ConfigRecord({P.DESTINATIONS: sorted(cts),
                                                       P.CIPHERTEXTS: [cts[i] for i in sorted(cts)]})})
        if kind == P.MESSAGE_TYPES["masked"]:
            client.receive_shares(state, dict(zip(rec[P.PEERS], rec[P.CIPHERTEXTS])))
            if node in self.silent:
                return None
            update = [np.full(a.numpy().shape, DELTA[node]) for a in msg.content["arrays"].values()]
            scale = client.weight_scale(rec[P.WEIGHT], rec[P.WEIGHT_MAX]) if P.weighted(self.cfg) else 1.0
            self.scales[node] = scale
            values, _ = client.prepare_update(update, sa=self.cfg.secure_aggregation, clip_norm=0.0,
                                              noise_std=0.0, rng=np.random.default_rng(node), scale=scale)
            self.sent_inputs[node] = values
            masked = client.mask(state, values, modulus_bits=self.cfg.secure_aggregation.modulus_bits)
            return RecordDict({P.MASKED_KEY: ArrayRecord({P.MASKED_ARRAY: Array(masked.astype(np.uint32))}),
                               "metrics": MetricRecord({"num-examples": 10, "loss": float(node)})})
        b, keys = client.reveal(state, list(rec[P.PEERS]), list(rec[P.DROPPED]))
        return RecordDict({P.RECORD: ConfigRecord({P.SHARE_OWNERS: list(b), P.SHARES: list(b.values()),
                                                   P.KEY_OWNERS: list(keys), P.KEY_SHARES: list(keys.values())})})


@pytest.fixture(autouse=True)
def in_a_serverapp(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def start() -> ArrayRecord:
    return ArrayRecord({"a": Array(np.zeros((2, 3), dtype=np.float32)), "b": Array(np.ones(4, dtype=np.float32))})


def strategy() -> FedAvg:
    return FedAvg(min_train_nodes=4, min_available_nodes=4, min_evaluate_nodes=2,
                  weighted_by_key="num-examples", arrayrecord_key="arrays")


def run(config: ExperimentConfig, devices: Devices, rounds: int = 1, strat=None):
    strat = strat or strategy()
    plan = RoundPlan(num_rounds=rounds, timeout=0.3, initial_evaluation=False,
                     secure=SecureTrain(config, strat))
    logged = []
    arrays, history = run_rounds(devices, strat, plan, start(), log_metrics=lambda m, s: logged.append(m))
    return arrays, history


def test_the_global_adapter_moves_by_the_mean_of_the_survivors_updates() -> None:
    devices = Devices(cfg(), silent={3})
    arrays, history = run(cfg(), devices)
    mean = (0.25 - 0.5 + 0.5) / 3  # node 3 dropped after sharing keys: recovered, not counted
    np.testing.assert_allclose(arrays["a"].numpy(), np.full((2, 3), mean), atol=2 ** -14)
    np.testing.assert_allclose(arrays["b"].numpy(), np.full(4, 1 + mean), atol=2 ** -14)
    r = history.rounds[0]
    assert (r["secagg_survivors"], r["secagg_dropped"], r["secagg_abandoned"]) == (3, 1, 0)
    assert r["train_loss"] == pytest.approx((1 + 2 + 4) / 3)
    assert [c["status"] for c in history.clients if c["phase"] == "train"] == ["ok"] * 3 + ["timed_out"]
    # the server's inbox: no reply carries any client's quantized input
    for reply in devices.received:
        for record in reply.content.array_records.values():
            for arr in record.values():
                for x in devices.sent_inputs.values():
                    assert not np.array_equal(arr.numpy().astype(np.uint64), x)


def test_a_weighted_round_moves_by_the_capped_example_weighted_mean() -> None:
    """Claims 10, 30, 20, 1000: node 4 is capped at 4 x median 25 = 100, as the plain path
    caps it; node 3 drops. Survivors scale by w/W (W = 100): 0.1, 0.3, 1."""
    devices = Devices(cfg(), silent={3}, claims={1: 10, 2: 30, 3: 20, 4: 1000})
    arrays, history = run(cfg(), devices)
    mean = (10 * 0.25 + 30 * -0.5 + 100 * 0.5) / 140
    np.testing.assert_allclose(arrays["a"].numpy(), np.full((2, 3), mean), atol=2 ** -14)
    assert devices.scales == {1: 0.1, 2: 0.3, 4: 1.0}
    r = history.rounds[0]
    assert (r["secagg_weighted"], r["secagg_weight_total"], r["secagg_survivors"]) == (1.0, 140.0, 3.0)


def test_equal_weighting_ignores_the_claims() -> None:
    config = cfg(weighting="equal")
    arrays, history = run(config, Devices(config, silent={3}, claims={1: 10, 2: 30, 3: 20, 4: 1000}))
    np.testing.assert_allclose(arrays["a"].numpy(), np.full((2, 3), (0.25 - 0.5 + 0.5) / 3), atol=2 ** -14)
    assert (history.rounds[0]["secagg_weighted"], history.rounds[0]["secagg_weight_total"]) == (0.0, 3.0)


def test_a_bad_example_count_with_the_keys_is_rejected_and_the_round_goes_on() -> None:
    devices = Devices(cfg(), claims={1: 10, 2: 0, 3: 10, 4: 10})
    arrays, history = run(cfg(), devices)
    np.testing.assert_allclose(arrays["a"].numpy(), np.full((2, 3), (0.25 + 0.125 + 0.5) / 3), atol=2 ** -14)
    assert history.rounds[0]["secagg_rejected"] == 1
    assert [c["error"] for c in history.clients if c.get("status") == "rejected"] == [
        "key advertisement: bad num-examples: 0"]


def test_capped_weights_follow_the_plain_paths_caps() -> None:
    claims = {1: {"num-examples": 10, "partition-id": 0}, 2: {"num-examples": 30, "partition-id": 1},
              3: {"num-examples": 1000, "partition-id": 2}}
    assert capped_weights(claims, weight_cap=4.0, known_sizes=None) == {1: 10, 2: 30, 3: 120}
    assert capped_weights(claims, weight_cap=4.0, known_sizes={0: 8, 1: 30, 2: 50}) == {1: 8, 2: 30, 3: 50}
    assert capped_weights(claims, weight_cap=0, known_sizes={0: 8, 1: 30, 2: 50}) == {1: 10, 2: 30, 3: 1000}


def test_below_the_threshold_the_round_is_abandoned_and_the_adapter_unchanged() -> None:
    arrays, history = run(cfg(), Devices(cfg(), silent={2, 3}), rounds=2)
    np.testing.assert_array_equal(arrays["a"].numpy(), np.zeros((2, 3)))
    assert [r["secagg_abandoned"] for r in history.rounds] == [1.0, 1.0]
    assert [r["round"] for r in history.rounds] == [1, 2]  # on_abandon=continue


def test_on_abandon_stop_ends_the_run() -> None:
    config = cfg(on_abandon="stop")
    _, history = run(config, Devices(config, silent={2, 3}), rounds=3)
    assert [r["round"] for r in history.rounds] == [1]


def test_the_ledger_records_the_distributed_noise_as_dp_fedavg_would() -> None:
    config = ExperimentConfig.from_dict({**cfg().to_dict(), "privacy": {
        "mode": "dp_fedavg", "noise_multiplier": 1.0, "clipping_norm": 0.1}})
    dp = UserLevelDp(strategy(), new_server_state(config), privacy=config.privacy, expected_sampled=4)
    run(config, Devices(config, silent={3}), strat=dp)
    # 3 survivors, threshold 3: the sum carries exactly z*C, as DP-FedAvg's noise on it
    assert dp.state.releases == [Release(1, 1.0, 4, 4)]
    assert dp.state.epsilon() == user_level_epsilon([Release(1, 1.0, 4, 4)], delta=dp.state.delta)
    assert dp.last_round["dp_updates_averaged"] == 3


def test_more_survivors_than_the_threshold_carry_more_noise() -> None:
    release = distributed_release(1, noise_multiplier=1.0, survivors=12, threshold=3, sampled=12, population=20)
    assert release == Release(1, 2.0, 12, 20)
    assert user_level_epsilon([release], delta=1e-3) < user_level_epsilon([Release(1, 1.0, 12, 20)], delta=1e-3)
    with pytest.raises(ValueError, match="2 survivors is below the threshold 3"):
        distributed_release(1, noise_multiplier=1.0, survivors=2, threshold=3, sampled=4, population=4)


def test_distributed_noise_sums_to_variance_sigma_squared() -> None:
    """t clients each add N(0, (zC)^2/t) before quantization: the dequantized sum of
    their (zero) updates has variance (zC)^2 (statistical test over 200,000 values)."""
    sa = cfg(quantization_bits=24, modulus_bits=32, clipping_range=4.0).secure_aggregation
    z, c, t, d = 1.5, 0.4, 5, 200_000
    std = client.noise_std(noise_multiplier=z, clipping_norm=c, threshold=t)
    assert std == pytest.approx(z * c / math.sqrt(t))
    total = np.zeros(d, dtype=np.uint64)
    for i in range(t):
        values, _ = client.prepare_update([np.zeros(d)], sa=sa, clip_norm=c, noise_std=std,
                                          rng=np.random.default_rng(i))
        total = total + values
    from fedslm.secagg.ring import dequantize_sum
    noise = dequantize_sum(total, t, clipping_range=sa.clipping_range, quantization_bits=sa.quantization_bits)
    # sample variance of 200,000 normals: relative stddev sqrt(2/d) = 0.32%; 5 sigma = 1.6%
    assert noise.var() == pytest.approx((z * c) ** 2, rel=0.016)
    assert abs(noise.mean()) < 5 * z * c / math.sqrt(d)
