"""No reply stops a run: the replies that used to crash the ServerApp, each sent by one
hostile node beside two honest ones through the real round loop; and bounded influence
(clip, weight cap) with exact values on hand-built updates."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from numpy.lib import format as npy

from fedslm.config import ExperimentConfig, RobustConfig
from fedslm.server.privacy_rounds import RoundPrivacy
from fedslm.server.rounds import RoundPlan, run_rounds
from fedslm.server.screening import (bound_influence, cap_evaluate_weights, screen_evaluate_replies,
                              screen_status_replies, screen_train_replies)

W = np.zeros(4, np.float32)


def _npy_header(text: bytes) -> bytes:
    """An npy v1.0 file whose header is ``text`` (padded as numpy pads it)."""
    text = text + b" " * (63 - (10 + len(text)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


def _hostile_train(sent: RecordDict, kind: str) -> RecordDict:
    good = ArrayRecord({"w": Array(sent["arrays"]["w"].numpy() + 3)})
    metrics = {"loss": 3.0, "num-examples": 3}
    if kind == "npy_unclosed_bracket":
        bad = Array(dtype="float32", shape=(4,), stype="numpy.ndarray",
                    data=_npy_header(b"{'descr': '<f4', 'fortran_order': False, 'shape': (4,"))
        return RecordDict({"arrays": ArrayRecord({"w": bad}), "metrics": MetricRecord(metrics)})
    if kind == "extra_metric_key":
        return RecordDict({"arrays": good, "metrics": MetricRecord({**metrics, "sneaky": 1.0})})
    if kind == "extra_record":
        return RecordDict({"arrays": good, "metrics": MetricRecord(metrics),
                           "more": MetricRecord({"x": 1.0})})
    if kind == "list_metric":
        return RecordDict({"arrays": good, "metrics": MetricRecord({**metrics, "loss": [1.0, 2.0]})})
    if kind in ("compressed_overflow", "compressed_valueerror"):
        shape = (2**70,) if kind == "compressed_overflow" else (2**40, 2**40)
        huge = Array(dtype="int8", shape=shape, stype="numpy.ndarray", data=b"\0" * 16)
        return RecordDict({"arrays": ArrayRecord({"delta": huge, "scales": Array(np.ones(1, np.float32))}),
                           "metrics": MetricRecord(metrics),
                           "compression": ConfigRecord({"method": "int8"})})
    if kind in ("status_nan_partition", "status_list_epsilon"):
        bad = ({"partition-id": math.nan, "dp-epsilon": 1.0} if kind == "status_nan_partition"
               else {"partition-id": 3, "dp-epsilon": [1.0, 2.0]})
        return RecordDict({"metrics": MetricRecord(bad),
                           "status": ConfigRecord({"status": "budget-exhausted", "message": "spent"})})
    return RecordDict({"arrays": good, "metrics": MetricRecord(metrics)})  # honest in train


def _hostile_evaluate(kind: str) -> RecordDict:
    if kind == "evaluate_missing_weight":
        return RecordDict({"metrics": MetricRecord({"loss": 2.0})})
    if kind == "evaluate_extra_key":
        return RecordDict({"metrics": MetricRecord({"loss": 2.0, "num-examples": 4, "extra": 7.0})})
    return RecordDict({"metrics": MetricRecord({"loss": 2.0, "num-examples": 4})})


class Devices:
    """Nodes 1, 2 honest (train: sent + node id); node 3 sends the hostile ``kind``."""

    def __init__(self, kind: str) -> None:
        self.kind, self.outbox = kind, {}

    def get_node_ids(self):
        return [1, 2, 3]

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg_id = f"{msg.metadata.group_id}-{msg.metadata.message_type}-{i}"
            msg.metadata.__dict__["_message_id"] = msg_id
            ids.append(msg_id)
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == "train":
                if node == 3:
                    content = _hostile_train(msg.content, self.kind)
                else:
                    arrays = ArrayRecord({"w": Array(msg.content["arrays"]["w"].numpy() + node)})
                    rnd = int(msg.content.config_records["config"]["server-round"])
                    ledger = {"dp-epsilon": 0.5 * rnd, "dp-steps-total": 10 * rnd, "dp-steps": 10}
                    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(
                        {"loss": float(node), "num-examples": node, **ledger})})
            else:
                content = _hostile_evaluate(self.kind if node == 3 else "honest")
            reply = Message(content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            self.outbox[msg_id] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.outbox.pop(i) for i in list(message_ids) if i in self.outbox]


@pytest.fixture
def in_a_serverapp(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


# kind -> (phase, reason in clients.csv; None: accepted, the round goes on)
RUN_STOPPERS = {
    "npy_unclosed_bracket": ("train", "tensor w: payload is not an npy array ("),
    "extra_metric_key": ("train", None),
    "extra_record": ("train", "unexpected records ['more']"),
    "list_metric": ("train", "metric loss is a list; only ['confusion', 'personal_confusion'] may be"),
    "evaluate_missing_weight": ("evaluate", "bad num-examples: None"),
    "evaluate_extra_key": ("evaluate", None),
    "compressed_overflow": ("train", "compressed update: delta: payload is not an npy array"),
    "compressed_valueerror": ("train", "compressed update: delta: payload is not an npy array"),
    "status_nan_partition": ("train", "metric partition-id is nan, expected an int"),
    "status_list_epsilon": ("train", "metric dp-epsilon is a list; only ['confusion', 'personal_confusion'] may be"),
}


@pytest.mark.parametrize("kind", sorted(RUN_STOPPERS))
def test_a_reply_that_stopped_the_run_is_screened_and_the_round_goes_on(in_a_serverapp, kind):
    phase, reason = RUN_STOPPERS[kind]
    cfg = ExperimentConfig.from_dict({"federation": {"num_clients": 3},
                                      "privacy": {"mode": "dp_sgd"}})
    plan = RoundPlan(num_rounds=2, timeout=5.0, initial_evaluation=False,
                     privacy=RoundPrivacy(cfg) if kind.startswith("status") else None)
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=3, min_evaluate_nodes=3)
    arrays, history = run_rounds(Devices(kind), strategy, plan, ArrayRecord({"w": Array(W)}),
                                 log_metrics=lambda m, s: None)
    assert [r["round"] for r in history.rounds] == [1, 2]
    rows = [r for r in history.clients if r["node_id"] == 3 and r["phase"] == phase]
    if reason is None:
        assert {r["status"] for r in rows} == {"ok"}
    else:
        assert [r["status"] for r in rows] == ["rejected", "rejected"]
        assert all(r["error"].startswith(reason) for r in rows), rows[0]["error"]
    honest_only = phase == "train" and reason is not None
    # FedAvg of +1 (1 example), +2 (2) [, +3 (3)], each delta clipped to the median norm
    # (default bounds): +1, +1.5 (median of norms 2, 4) [or +1, +2, +2 (median of 2, 4, 6)]
    per_round = (1 + 2 * 1.5) / 3 if honest_only else (1 + 2 * 2 + 3 * 2) / 6
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(4, 2 * per_round), rtol=1e-6)
    assert arrays["w"].numpy().dtype == np.float32


def _msg(node: int, content: RecordDict, kind: str = "train") -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id="q", group_id="1", created_at=0.0, ttl=60.0,
                        message_type=kind)
    return make_message(metadata, content)


def _update(node: int, values: np.ndarray, n: int) -> Message:
    return _msg(node, RecordDict({"arrays": ArrayRecord({"w": Array(values)}),
                                  "metrics": MetricRecord({"num-examples": n, "loss": 1.0})}))


REF = ArrayRecord({"w": Array(np.zeros(4, np.float32))})


def test_the_global_dtype_is_the_servers_and_values_are_bounded() -> None:
    replies = [_update(1, np.ones(4, np.float64), 1), _update(2, np.ones(4, np.float16), 1),
               _update(3, np.full(4, 2e4, np.float32), 1), _update(4, np.ones(4, np.float32), 1)]
    screened = screen_train_replies(replies, REF)
    assert [m.metadata.src_node_id for m in screened.accepted] == [4]
    assert screened.rejected == {
        1: "tensor w has dtype float64, expected float32 (the server's)",
        2: "tensor w has dtype float16, expected float32 (the server's)",
        3: "tensor w has a value beyond +-10000",
    }


def test_adaptive_clip_and_weight_cap_on_a_ten_to_the_twelve_claim() -> None:
    # deltas of norm 1, 2, 3 and 100 (a scaled update) claiming 10, 10, 20 and 10^12 examples
    replies = [_update(1, np.full(4, 0.5, np.float32), 10), _update(2, np.full(4, 1.0, np.float32), 10),
               _update(3, np.full(4, 1.5, np.float32), 20), _update(4, np.full(4, 50.0, np.float32), 10**12)]
    bounded = bound_influence(screen_train_replies(replies, REF).accepted, REF, RobustConfig())
    # default bound = 1 x median(1, 2, 3, 100) = 2.5 (the median norm); cap = 4 x median(10, 10, 20, 10^12) = 60
    assert bounded.metrics == {"robust_clip_bound": 2.5, "robust_clipped_fraction": 0.5,
                               "robust_weights_capped": 1.0, "robust_weight_cap": 60.0,
                               "robust_update_norm_median": 2.5}
    assert bounded.notes[3] == {"update_norm": 3.0, "num-examples": 20,
                                "screening": "delta norm 3 clipped to 2.5"}
    assert bounded.notes[4] == {"update_norm": 100.0, "num-examples": 60,
                                "screening": "delta norm 100 clipped to 2.5; num-examples "
                                             "1000000000000 capped to 60"}
    np.testing.assert_array_equal(bounded.replies[2].content["arrays"]["w"].numpy(), np.full(4, 1.25))
    np.testing.assert_array_equal(bounded.replies[3].content["arrays"]["w"].numpy(), np.full(4, 1.25))
    arrays, _ = FedAvg().aggregate_train(1, bounded.replies)
    # (10 * 0.5 + 10 * 1 + 20 * 1.25 + 60 * 1.25) / 100
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(4, 1.15), rtol=1e-6)
    # clip_multiple=2: bound 5, only the scaled update is clipped
    twice = bound_influence(screen_train_replies(
        [_update(n, np.full(4, v, np.float32), 10) for n, v in ((1, 0.5), (2, 1.0), (3, 1.5), (4, 50.0))],
        REF).accepted, REF, RobustConfig(clip_multiple=2.0))
    assert twice.metrics["robust_clip_bound"] == 5.0 and twice.metrics["robust_clipped_fraction"] == 0.25
    np.testing.assert_array_equal(twice.replies[3].content["arrays"]["w"].numpy(), np.full(4, 2.5))


@pytest.mark.parametrize(("robust", "mean"), [
    (RobustConfig(clip="none", weight_cap=0), -1.2),  # no bounds: (4 - 10) / 5
    (RobustConfig(clip_multiple=2.0), 0.4),  # twice the median norm: (4 - 2) / 5
    (RobustConfig(), 0.6),  # the default, the median norm: (4 - 1) / 5
])
def test_a_sign_flipped_update_weighs_at_most_one_honest_update(robust, mean) -> None:
    # four honest clients send delta u (norm 1), one sends -10 u (attack.kind=sign_flip, scale 10)
    u = np.full(4, 0.5, np.float32)
    replies = [_update(n, u, 10) for n in (1, 2, 3, 4)] + [_update(5, -10 * u, 10)]
    bounded = bound_influence(screen_train_replies(replies, REF).accepted, REF, robust)
    arrays, _ = FedAvg().aggregate_train(1, bounded.replies)
    np.testing.assert_allclose(arrays["w"].numpy(), mean * u, rtol=1e-6)


def test_a_same_value_update_is_clipped_to_the_median_norm() -> None:
    # honest deltas of norm 1, 1.2, 1.4; node 4 sets every value to 1 (norm 2): the bound is
    # the median norm 1.3, so node 4 counts no more than a typical honest update
    replies = [_update(1, np.full(4, 0.5, np.float32), 10), _update(2, np.full(4, 0.6, np.float32), 10),
               _update(3, np.full(4, 0.7, np.float32), 10), _update(4, np.full(4, 1.0, np.float32), 10)]
    bounded = bound_influence(screen_train_replies(replies, REF).accepted, REF, RobustConfig())
    assert bounded.metrics["robust_clip_bound"] == pytest.approx(1.3)  # median(1, 1.2, 1.4, 2)
    np.testing.assert_allclose(bounded.replies[3].content["arrays"]["w"].numpy(), np.full(4, 0.65), rtol=1e-6)
    np.testing.assert_allclose(bounded.replies[2].content["arrays"]["w"].numpy(), np.full(4, 0.65), rtol=1e-6)
    np.testing.assert_allclose(bounded.replies[1].content["arrays"]["w"].numpy(), np.full(4, 0.6), rtol=1e-6)


def _claim(node: int, n: int, **metrics) -> Message:
    return _msg(node, RecordDict({"arrays": ArrayRecord({"w": Array(np.full(4, 0.5, np.float32))}),
                                  "metrics": MetricRecord({"num-examples": n, "loss": 1.0, **metrics})}))


def test_in_simulation_a_weight_is_capped_at_its_partitions_known_size() -> None:
    known = {0: 12, 1: 15, 2: 30}
    replies = [_claim(1, 12, **{"partition-id": 0}), _claim(2, 10**12, **{"partition-id": 1}),
               _claim(3, 10**12, **{"partition-id": 7}), _claim(4, 10**12)]
    bounded = bound_influence(replies, REF, RobustConfig(), known_sizes=known)
    # median cap 4 x median(12, 1e12, 1e12, 1e12) is no bound here; the known sizes are:
    # partition 1 -> 15; an unknown partition (7) or none -> the largest partition's, 30
    assert [bounded.notes[n]["num-examples"] for n in (1, 2, 3, 4)] == [12, 15, 30, 30]
    assert bounded.notes[2]["screening"] == "num-examples 1000000000000 capped to 15"
    assert bounded.metrics["robust_weights_capped"] == 3.0
    assert [m.content["metrics"]["num-examples"] for m in bounded.replies] == [12, 15, 30, 30]
    off = bound_influence([_claim(1, 10**12, **{"partition-id": 1})], REF,
                          RobustConfig(clip="none", weight_cap=0), known_sizes=known)
    assert off.notes[1]["num-examples"] == 10**12  # robust=off turns every cap off


def test_the_known_sizes_are_what_each_simulated_client_counts() -> None:
    import dataclasses

    from fedslm.client.records import client_tensors
    from fedslm.client.task import evaluate, fit
    from fedslm.runtime import experiment_model
    from fedslm.server.experiment import initial_adapter, partition_test_sizes, partition_train_sizes

    cfg = ExperimentConfig.from_dict({"federation": {"num_clients": 3},
                                      "training": {"local_steps": 1}})
    sizes, test_sizes = partition_train_sizes(cfg), partition_test_sizes(cfg)
    assert sorted(sizes) == [0, 1, 2] and min(sizes.values()) > 0
    for pid in (0, 2):
        _, metrics = fit(cfg, initial_adapter(cfg), partition_id=pid, server_round=1)
        assert metrics["num-examples"] == sizes[pid]
        assert evaluate(cfg, initial_adapter(cfg), partition_id=pid)["num-examples"] == test_sizes[pid]
    # at most eval_max_batches x batch_size evaluated; one row per document under unit=document
    short = ExperimentConfig.from_dict({"federation": {"num_clients": 3},
                                        "training": {"eval_max_batches": 1, "batch_size": 2}})
    assert partition_test_sizes(short)[0] == 2 == evaluate(short, initial_adapter(short),
                                                           partition_id=0)["num-examples"]
    docs = ExperimentConfig.from_dict({"federation": {"num_clients": 3},
                                       "privacy": {"mode": "dp_sgd", "unit": "document"}})
    _, tokenizer = experiment_model(docs)  # fit reports its train tensors' rows
    rows = client_tensors(docs, 1, "train", tokenizer)[0].shape[0]
    assert partition_train_sizes(docs)[1] == rows != sizes[1]
    remote = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, engine="remote"))
    assert partition_train_sizes(remote) is None and partition_test_sizes(remote) is None


def test_in_simulation_an_evaluate_weight_is_capped_at_its_partitions_known_test_size() -> None:
    rows = [{"node_id": 1, "num-examples": 6, "partition-id": 0},
            {"node_id": 2, "num-examples": 10**12, "partition-id": 1},
            {"node_id": 3, "num-examples": 10**12, "partition-id": 9},
            {"node_id": 4, "num-examples": 6}]
    # median cap 4 x median(6, 6, 1e12, 1e12) is no bound here; the known test sizes are:
    # partition 1 -> 8; an unknown partition (9) or none -> the largest, 12
    assert cap_evaluate_weights(rows, 4.0, known_sizes={0: 6, 1: 8, 2: 12}) == 2 * 10**12 + 12
    assert [r["num-examples"] for r in rows] == [6, 8, 12, 6]
    assert rows[1]["screening"] == "num-examples 1000000000000 capped to 8"
    off = [{"node_id": 1, "num-examples": 10**12, "partition-id": 1}]
    assert cap_evaluate_weights(off, 0.0, known_sizes={0: 6, 1: 8}) is None  # robust=off
    assert off[0]["num-examples"] == 10**12


def test_fixed_clip_and_no_bounds() -> None:
    replies = [_update(1, np.full(4, 0.5, np.float32), 10), _update(2, np.full(4, 50.0, np.float32), 10**12)]
    fixed = bound_influence(screen_train_replies(replies, REF).accepted, REF,
                            RobustConfig(clip="fixed", clip_norm=0.5, weight_cap=0))
    assert fixed.metrics["robust_clip_bound"] == 0.5 and "robust_weight_cap" not in fixed.metrics
    np.testing.assert_array_equal(fixed.replies[0].content["arrays"]["w"].numpy(), np.full(4, 0.25))
    np.testing.assert_array_equal(fixed.replies[1].content["arrays"]["w"].numpy(), np.full(4, 0.25))
    replies = [_update(1, np.full(4, 0.5, np.float32), 10), _update(2, np.full(4, 50.0, np.float32), 10**12)]
    off = bound_influence(replies, REF, RobustConfig(clip="none", weight_cap=0))
    assert off.metrics == {"robust_clipped_fraction": 0.0, "robust_weights_capped": 0.0,
                           "robust_update_norm_median": 50.5}
    np.testing.assert_array_equal(off.replies[1].content["arrays"]["w"].numpy(), np.full(4, 50.0))


def test_evaluate_metrics_are_screened_and_weights_capped() -> None:
    def ev(node, metrics):
        return _msg(node, RecordDict({"metrics": MetricRecord(metrics)}), "evaluate")

    replies = [ev(1, {"loss": 2.0, "num-examples": 10}), ev(2, {"loss": 2.0, "num-examples": 10}),
               ev(3, {"loss": 0.0, "num-examples": 10**12}),
               ev(4, {"loss": 2.0, "num-examples": 10, "confusion": [3, 1, 0, 6]}),
               ev(5, {"loss": 2.0, "num-examples": 10, "accuracy": 1.5}),
               ev(6, {"loss": 2.0, "num-examples": 10, "confusion": [3, -1]}),
               ev(7, {"loss": math.inf, "num-examples": 10}),
               ev(8, {"loss": 2.0, "num-examples": 0})]
    screened = screen_evaluate_replies(replies)
    assert [m.metadata.src_node_id for m in screened.accepted] == [1, 2, 3, 4]
    assert screened.rejected == {5: "metric accuracy is 1.5, outside [0, 1]",
                                 6: "metric confusion must hold non-negative ints",
                                 7: "metric loss is not finite", 8: "bad num-examples: 0"}
    rows = [{"node_id": m.metadata.src_node_id, **m.content["metrics"]} for m in screened.accepted]
    assert cap_evaluate_weights(rows, 4.0) == 40
    assert rows[2]["num-examples"] == 40
    assert rows[2]["screening"] == "num-examples 1000000000000 capped to 40"


def test_status_replies_must_be_a_known_status_with_valid_metrics() -> None:
    def status(node, value, metrics):
        return _msg(node, RecordDict({"metrics": MetricRecord(metrics),
                                      "status": ConfigRecord({"status": value, "message": "m"})}))

    replies = [status(1, "budget-exhausted", {"partition-id": 1, "dp-epsilon": 2.0}),
               status(2, "budget-exhausted", {"partition-id": 2, "dp-delta": 2.0}),
               status(3, "no-thanks", {}), _update(4, np.ones(4, np.float32), 3)]
    screened = screen_status_replies(replies)
    assert [m.metadata.src_node_id for m in screened.accepted] == [1, 4]
    assert screened.rejected == {2: "metric dp-delta is 2.0, outside [0, 1]",
                                 3: "unknown status 'no-thanks'"}


def test_a_client_reports_only_its_own_epsilon() -> None:
    cfg = ExperimentConfig.from_dict({"federation": {"num_clients": 3}, "privacy": {"mode": "dp_sgd"}})
    privacy = RoundPrivacy(cfg)
    rows = [{"node_id": 1, "partition-id": 0, "dp-epsilon": 5.0, "dp-delta": 1e-3},
            {"node_id": 2, "partition-id": 0, "dp-epsilon": 0.1, "dp-delta": 1e-3}]  # lies: pid 0
    assert privacy.round_metrics(1, rows, [])["dp_epsilon_sample_max"] == 5.0


def test_a_reply_compressed_with_another_method_than_configured_is_rejected() -> None:
    from fedslm.server.decompress import decode_train_replies

    fp16 = RecordDict({"arrays": ArrayRecord({"delta": Array(np.ones(4, np.float16))}),
                       "metrics": MetricRecord({"num-examples": 1}),
                       "compression": ConfigRecord({"method": "fp16"})})
    plain = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(4, np.float32))}),
                        "metrics": MetricRecord({"num-examples": 1})})
    decoded = decode_train_replies([_msg(1, fp16), _msg(2, plain)], REF, "none")
    assert decoded.rejected == {1: "compressed update: sent as 'fp16', the server expects 'none'"}
    decoded = decode_train_replies([_msg(1, fp16), _msg(2, plain)], REF, "fp16")
    assert decoded.rejected == {2: "compressed update: sent as 'none', the server expects 'fp16'"}


def test_int8_scales_beyond_the_value_bound_are_rejected() -> None:
    from fedslm.server.decompress import decode_train_replies

    scaled = RecordDict({"arrays": ArrayRecord({"delta": Array(np.full(4, 127, np.int8)),
                                                "scales": Array(np.array([1e30], np.float32))}),
                         "metrics": MetricRecord({"num-examples": 1}),
                         "compression": ConfigRecord({"method": "int8"})})
    decoded = decode_train_replies([_msg(1, scaled)], REF, "int8")
    assert decoded.rejected == {1: "compressed update: int8: a scale exceeds 78.7402 "
                                   "(decoded values are bounded by 10000)"}


def test_npy_with_an_unclosed_bracket_is_a_wire_error() -> None:
    from fedslm.wire import WireError, decode_array

    bad = Array(dtype="float32", shape=(4,), stype="numpy.ndarray",
                data=_npy_header(b"{'descr': '<f4', 'fortran_order': False, 'shape': (4,"))
    with pytest.raises(WireError, match="payload is not an npy array"):
        decode_array(bad)
    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (4,)})
    assert decode_array(Array(dtype="float32", shape=(4,), stype="numpy.ndarray",
                              data=buf.getvalue() + b"\0" * 16)).tolist() == [0.0] * 4
