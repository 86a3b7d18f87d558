"""Aggregation rules wired into the client and the round loop: FFA's A stays put and
home, each client gets and returns its own rank, screening holds each reply to its rank."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedslm.client.app import app
from fedslm.adapters import adapter_arrays, from_array_record, payload_bytes, to_array_record
from fedslm.aggregation.lora_factors import rank_of, truncate
from fedslm.config import ExperimentConfig
from fedslm.runconfig import to_run_config
from fedslm.runtime import experiment_model
from fedslm.server.experiment import fixed_adapter, initial_adapter
from fedslm.server.lora_aggregation import LoraAggregation, with_aggregation
from fedslm.server.rounds import screen_against_sent, sent_adapters

NUM_CLIENTS = 3


def _cfg(tmp_path, **extra) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "federation": {"num_clients": NUM_CLIENTS}, "training": {"local_steps": 2},
        "data": {"docs_per_client": 16}, "output_dir": str(tmp_path), **extra})


def _message(kind: str, arrays: ArrayRecord, node: int = 11, server_round: int = 1) -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=0, dst_node_id=node,
                        reply_to_message_id="", group_id="1", created_at=0.0, ttl=600.0,
                        message_type=kind)
    return make_message(metadata, RecordDict({"arrays": arrays,
                                              "config": ConfigRecord({"server-round": server_round})}))


def _context(cfg: ExperimentConfig, partition: int) -> Context:
    return Context(run_id=1, node_id=11, node_config={"partition-id": partition,
                   "num-partitions": NUM_CLIENTS}, state=RecordDict(), run_config=to_run_config(cfg))


def test_ffa_a_never_travels_never_changes_and_b_bytes_are_exact(tmp_path) -> None:
    plain = initial_adapter(_cfg(tmp_path / "plain"))
    cfg = _cfg(tmp_path, aggregation={"name": "ffa"})
    sent = initial_adapter(cfg)
    assert set(sent) == {n for n in plain if "lora_B" in n}  # the global holds no A at all
    a_init = {n: v for n, v in plain.items() if "lora_A" in n}
    # tiny-llama: 2 layers x (q_proj, v_proj), B is (64 x 8) float32 = 2,048 B + a 128 B
    # .npy header each: 8,704 B per message, half of FedAvg's 17,408 B (A and B)
    assert payload_bytes(to_array_record(sent)) == 8704
    assert payload_bytes(to_array_record(plain)) == 17408
    for rnd, partition in ((1, 0), (2, 1)):
        reply = app(_message("train", to_array_record(sent), server_round=rnd), _context(cfg, partition))
        back = from_array_record(reply.content["arrays"])
        assert set(back) == set(sent) and payload_bytes(reply.content["arrays"]) == 8704
        assert any(not np.array_equal(back[n], sent[n]) for n in sent)  # B trained
        model, _ = experiment_model(cfg)
        fixed = adapter_arrays(model, "fixed")  # A in the client's model: still PEFT's seeded init
        assert set(fixed) == set(a_init)
        assert all(np.array_equal(fixed[n], a_init[n]) for n in a_init)
        sent = back
    assert set(fixed_adapter(cfg)) == set(a_init)  # the saved adapter gets A back


def test_a_client_trains_and_returns_the_rank_it_was_sent(tmp_path) -> None:
    cfg = _cfg(tmp_path, peft={"r": 8, "ranks": "0 r=2, * r=8"})
    sent = truncate(initial_adapter(cfg), 2)
    reply = app(_message("train", to_array_record(sent)), _context(cfg, partition=0))
    back = from_array_record(reply.content["arrays"])
    assert {n: v.shape for n, v in back.items()} == {n: v.shape for n, v in sent.items()}
    assert rank_of(back) == 2
    assert any(not np.array_equal(back[n], sent[n]) for n in sent if "lora_B" in n)


class Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _factors(rank: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"m.q.lora_A.weight": rng.standard_normal((rank, 5)).astype(np.float32),
            "m.q.lora_B.weight": rng.standard_normal((6, rank)).astype(np.float32)}


def _reply(to: Message, arrays: dict[str, np.ndarray], n: int) -> Message:
    reply = Message(RecordDict({"arrays": to_array_record(arrays),
                                "metrics": MetricRecord({"num-examples": n, "loss": n / 10})}),
                    reply_to=to)
    reply.metadata.__dict__["_src_node_id"] = to.metadata.dst_node_id
    return reply


def _wrapper(tmp_path, name: str, ranks: str, nodes: int = 3) -> LoraAggregation:
    cfg = _cfg(tmp_path, aggregation={"name": name}, peft={"r": 4, "ranks": ranks})
    strategy = with_aggregation(cfg, FedAvg(fraction_evaluate=1.0, min_available_nodes=nodes,
                                            min_train_nodes=nodes))
    assert isinstance(strategy, LoraAggregation)
    return strategy


@pytest.fixture
def in_a_serverapp(monkeypatch):
    """Flower stamps messages with the task's identity, set in a real ServerApp process."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def test_each_node_gets_its_rank_and_a_reply_at_another_rank_is_rejected(tmp_path, in_a_serverapp) -> None:
    strategy = _wrapper(tmp_path, "flexlora", "1 r=1, * r=4")
    strategy.partitions = {101: 0, 102: 1, 103: 2}  # as learned from round-0 evaluation
    glob = _factors(4, 0)
    messages = list(strategy.configure_train(1, to_array_record(glob), ConfigRecord(), Grid([101, 102, 103])))
    got = {m.metadata.dst_node_id: rank_of(from_array_record(m.content["arrays"])) for m in messages}
    assert got == {101: 4, 102: 1, 103: 4}
    by_node = {m.metadata.dst_node_id: m for m in messages}
    replies = [_reply(by_node[101], _factors(4, 1), 10), _reply(by_node[102], _factors(1, 2), 30),
               _reply(by_node[103], _factors(1, 3), 60)]  # node 103 answers at node 102's rank
    screened = screen_against_sent(replies, sent_adapters(messages))
    assert [m.metadata.src_node_id for m in screened.accepted] == [101, 102]
    assert screened.rejected == {103: "tensor m.q.lora_A.weight has shape (1, 5), expected (4, 5)"}
    arrays, metrics = strategy.aggregate_train(1, screened.accepted)
    out = from_array_record(arrays)
    f1, f2 = _factors(4, 1), _factors(1, 2)
    mean = 0.25 * (f1["m.q.lora_B.weight"].astype(np.float64) @ f1["m.q.lora_A.weight"]) \
        + 0.75 * (f2["m.q.lora_B.weight"].astype(np.float64) @ f2["m.q.lora_A.weight"])
    u, s, vt = np.linalg.svd(mean)
    np.testing.assert_allclose(out["m.q.lora_B.weight"].astype(np.float64) @ out["m.q.lora_A.weight"],
                               (u[:, :4] * s[:4]) @ vt[:4], atol=2e-5)
    assert strategy.aggregation_metrics["agg_rank_min"] == 1.0
    assert metrics["loss"] == pytest.approx((10 * 1 + 30 * 3) / 40)  # the wrapped FedAvg's weighting


def test_a_compressed_reply_is_decoded_against_the_rank_its_node_was_sent(tmp_path, in_a_serverapp) -> None:
    from fedslm.compression import update_records

    strategy = _wrapper(tmp_path, "fedavg", "50% r=2, 50% r=4", nodes=2)
    messages = list(strategy.configure_train(1, to_array_record(_factors(4, 0)), ConfigRecord(),
                                             Grid([7, 8])))
    by_node = {m.metadata.dst_node_id: m for m in messages}
    sent = from_array_record(by_node[7].content["arrays"])
    assert rank_of(sent) == 2  # node 7 sorts first: the first 50% get rank 2
    trained = {k: v + 0.5 for k, v in sent.items()}
    records = update_records(trained, sent, method="int8", residual_path=None)
    reply = Message(RecordDict({**records, "metrics": MetricRecord({"num-examples": 5})}),
                    reply_to=by_node[7])
    reply.metadata.__dict__["_src_node_id"] = 7
    screened = screen_against_sent([reply], sent_adapters(messages))
    assert screened.rejected == {}
    decoded = from_array_record(screened.accepted[0].content["arrays"])
    assert {k: v.shape for k, v in decoded.items()} == {k: v.shape for k, v in sent.items()}
    for name in sent:
        np.testing.assert_allclose(decoded[name], trained[name], atol=0.02)
