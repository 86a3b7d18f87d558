"""The round loop with Flower's FedAvg on a hand-built grid: a silent node is dropped with
a row saying so, every round ends in the checkpoint hook, and round 0 is optional."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedslm.server.rounds import RoundPlan, run_rounds


class Devices:
    """Nodes 1 and 2 answer at once (train: the sent adapter + node id); node 3 never does."""

    def __init__(self) -> None:
        self.outbox: dict[str, Message] = {}

    def get_node_ids(self):
        return [1, 2, 3]

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg_id = f"{msg.metadata.group_id}-{msg.metadata.message_type}-{i}"
            msg.metadata.__dict__["_message_id"] = msg_id
            ids.append(msg_id)
            node = msg.metadata.dst_node_id
            if node == 3:
                continue
            if msg.metadata.message_type == "train":
                arrays = ArrayRecord({k: Array(v.numpy() + node) for k, v in msg.content["arrays"].items()})
                content = RecordDict({"arrays": arrays,
                                      "metrics": MetricRecord({"loss": float(node), "num-examples": node})})
            else:
                content = RecordDict({"metrics": MetricRecord({"loss": 2.0, "num-examples": 4})})
            reply = Message(content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            self.outbox[msg_id] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.outbox.pop(i) for i in list(message_ids) if i in self.outbox]


@pytest.fixture
def in_a_serverapp(monkeypatch):
    """Flower stamps messages with the task's identity, set in a real ServerApp process."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.mark.parametrize("initial", [True, False])
def test_silent_node_is_dropped_each_round_and_every_round_is_checkpointed(in_a_serverapp,
                                                                           initial: bool) -> None:
    ended = []
    plan = RoundPlan(num_rounds=2, timeout=0.3, initial_evaluation=initial,
                     on_round_end=lambda rnd, arrays, metrics, rows: ended.append(
                         (rnd, float(arrays["w"].numpy()[0]), metrics["clients_timed_out"])))
    start = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=3, min_evaluate_nodes=3)
    arrays, history = run_rounds(Devices(), strategy, plan, start, log_metrics=lambda m, s: None)
    # FedAvg of +1 (1 example) and +2 (2 examples), the +2 clipped to the median norm
    # (default bounds) +1.5: +4/3 per round; node 3 never counts.
    assert ended == [(1, pytest.approx(4 / 3), 1.0), (2, pytest.approx(8 / 3), 1.0)]
    np.testing.assert_allclose(arrays["w"].numpy(), [8 / 3, 8 / 3], rtol=1e-6)
    assert [r["round"] for r in history.rounds] == ([0, 1, 2] if initial else [1, 2])
    dropped = [(r["round"], r["phase"], r["node_id"], r["status"]) for r in history.clients
               if r["status"] != "ok"]
    expected = [(1, "train", 3, "timed_out"), (1, "evaluate", 3, "timed_out"),
                (2, "train", 3, "timed_out"), (2, "evaluate", 3, "timed_out")]
    assert dropped == ([(0, "evaluate", 3, "timed_out")] if initial else []) + expected
    assert history.rounds[-1]["train_clients"] == 2.0


class SilentDevices(Devices):
    """Three nodes, none of which ever answers (a deadline no client can meet)."""

    def push_messages(self, messages):
        return [f"silent-{i}" for i, _ in enumerate(messages)]


def test_a_deadline_no_client_meets_fails_the_run_instead_of_finishing_untrained(
        in_a_serverapp) -> None:
    from fedslm.server.rounds import NoTrainingError

    ended = []
    plan = RoundPlan(num_rounds=3, timeout=0.05, initial_evaluation=False,
                     on_round_end=lambda *args: ended.append(args[0]))
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=3, min_evaluate_nodes=3)
    with pytest.raises(NoTrainingError) as err:
        run_rounds(SilentDevices(), strategy, plan, ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
                   log_metrics=lambda m, s: None)
    assert str(err.value) == ("federation.round_timeout: all 3 clients of round 1 missed the "
                              "0.05s deadline and none has trained yet; no client can meet it, "
                              "so the run stops instead of finishing untrained")
    assert ended == []
    # a resumed run (clients trained before) tolerates a round where all are late
    arrays, _ = run_rounds(SilentDevices(), strategy, plan,
                           ArrayRecord({"w": Array(np.zeros(2, np.float32))}), first_round=3,
                           log_metrics=lambda m, s: None)
    assert ended == [3]


class CountingDevices(Devices):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.sent += [m.metadata.message_type for m in messages]
        return super().push_messages(messages)


def test_fraction_evaluate_zero_sends_no_evaluate_message_and_the_central_evaluation_still_runs(
        in_a_serverapp) -> None:
    grid = CountingDevices()
    central = []
    plan = RoundPlan(num_rounds=2, timeout=0.3, initial_evaluation=True,
                     central_eval=lambda rnd, arrays: central.append(rnd) or {"central_loss": 1.0 / (rnd + 1)})
    strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2)
    _, history = run_rounds(grid, strategy, plan, ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
                            log_metrics=lambda m, s: None)
    assert grid.sent == ["train"] * 6  # 3 nodes x 2 rounds, not one evaluate message
    assert central == [0, 1, 2]
    assert [r["central_loss"] for r in history.rounds] == [1.0, 0.5, 1 / 3]
    assert [k for r in history.rounds for k in r if k.startswith("eval_")] == [
        "eval_clients_rejected", "eval_clients_dropped"] * 3
    assert history.rounds[0]["bytes_down_eval"] == 0
    assert {row["phase"] for row in history.clients} == {"train"}
