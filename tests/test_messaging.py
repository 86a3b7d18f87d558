"""send_and_collect against a hand-built grid: deadlines, errors, and late replies.

Flower's own strategy tests drive strategies with hand-built replies; this grid does the
same for the collection loop: it hands out replies at chosen moments, including a
straggler's late answer to the previous round's message.
"""

from __future__ import annotations

import time

import pytest

from flwr.app import Error, Message, MetricRecord, RecordDict

from fedslm.server.messaging import send_and_collect
from tests import fakes


def instruction(node: int, rnd: int) -> Message:
    return fakes.instruction(node, fakes.round_content(None, rnd), message_id="", group_id=str(rnd),
                             created_at=time.time(), ttl=43200.0)


def answer(to: str, node: int, rnd: int, *, error: str = "", code: int = 0) -> Message:
    return fakes.reply(node, RecordDict({"metrics": MetricRecord({"round": rnd})}),
                       error=Error(code=code, reason=error) if error else None, reply_to=to,
                       message_id=f"reply-{to}", group_id=str(rnd), created_at=time.time())


class ScriptedGrid:
    """Message ids ``r<round>-n<node>``; ``script`` maps pull number -> replies given then.

    Unlike the SuperLink (which returns only replies to the ids asked for), it hands out
    every reply it holds, so the collector itself must tell a stale reply from a current one.
    """

    def __init__(self, script: dict[int, list[Message]]) -> None:
        self.script = script
        self.pulls = 0
        self.pushed: list[Message] = []

    def push_messages(self, messages):
        self.pushed = list(messages)
        return [f"r{m.metadata.group_id}-n{m.metadata.dst_node_id}" for m in self.pushed]

    def pull_messages(self, message_ids):
        out = self.script.get(self.pulls, [])
        self.pulls += 1
        return out


def test_a_late_reply_from_round_one_is_never_taken_for_round_two() -> None:
    # Node 3 straggled in round 1; its round-1 reply arrives while round 2 is collected.
    grid = ScriptedGrid({0: [answer("r1-n3", 3, 1), answer("r2-n1", 1, 2)],
                         2: [answer("r2-n3", 3, 2)]})
    got = send_and_collect(grid, [instruction(1, 2), instruction(3, 2)], timeout=5, label="r2")
    assert [(m.metadata.src_node_id, m.metadata.reply_to_message_id) for m in got.ok] == [
        (1, "r2-n1"), (3, "r2-n3")]
    assert [m.content["metrics"]["round"] for m in got.ok] == [2, 2]
    assert got.failed == {} and got.timed_out == []


def test_deadline_drops_silent_nodes_and_voids_their_task() -> None:
    grid = ScriptedGrid({0: [answer("r1-n1", 1, 1), answer("r1-n2", 2, 1, error="ClientApp crashed")]})
    start = time.monotonic()
    got = send_and_collect(grid, [instruction(n, 1) for n in (1, 2, 3)], timeout=0.5, label="r1")
    assert 0.5 <= time.monotonic() - start < 2.0
    assert [m.metadata.src_node_id for m in got.ok] == [1]
    assert got.failed == {2: "ClientApp crashed"}
    assert got.timed_out == [3]
    # The SuperLink discards the task at the deadline, so a straggler skips it.
    assert [m.metadata.ttl for m in grid.pushed] == [0.5, 0.5, 0.5]


def test_a_message_the_superlink_refused_counts_as_failed() -> None:
    class Refusing(ScriptedGrid):
        def push_messages(self, messages):
            ids = list(super().push_messages(messages))
            return [None, ids[1]]

    grid = Refusing({0: [answer("r1-n2", 2, 1)]})
    got = send_and_collect(grid, [instruction(1, 1), instruction(2, 1)], timeout=2, label="r1")
    assert got.failed == {1: "message could not be pushed"}
    assert [m.metadata.src_node_id for m in got.ok] == [2]


def test_a_task_the_superlink_expired_is_a_timeout_and_an_offline_node_a_failure() -> None:
    grid = ScriptedGrid({0: [answer("r1-n1", 1, 1, error="Message Unavailable", code=3),
                             answer("r1-n2", 2, 1, error="Node Unavailable", code=5),
                             answer("r1-n3", 3, 1)]})
    got = send_and_collect(grid, [instruction(n, 1) for n in (1, 2, 3)], timeout=2, label="r1")
    assert got.timed_out == [1]
    assert got.failed == {2: "Node Unavailable"}
    assert [m.metadata.src_node_id for m in got.ok] == [3]


class FakeClock:
    """Stands in for the ``time`` module of fedslm.server.messaging: sleeping advances it."""

    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_the_pause_doubles_to_100_ms_then_is_a_twentieth_of_the_wait_up_to_1_s() -> None:
    from fedslm.server.messaging import poll_pause

    waited = (0.0, 0.005, 0.01, 0.03, 0.07, 0.15, 1.0, 2.0, 4.0, 10.0, 20.0, 600.0)
    assert [poll_pause(s) for s in waited] == pytest.approx([
        0.01, 0.01, 0.01, 0.03, 0.07, 0.1, 0.1, 0.1, 0.2, 0.5, 1.0, 1.0])


def test_polls_back_off_while_waiting_and_speed_up_after_a_reply(monkeypatch) -> None:
    import fedslm.server.messaging as messaging

    clock = FakeClock()
    monkeypatch.setattr(messaging, "time", clock)
    grid = ScriptedGrid({6: [answer("r1-n1", 1, 1)], 8: [answer("r1-n2", 2, 1)]})
    got = send_and_collect(grid, [instruction(1, 1), instruction(2, 1)], timeout=5, label="r1")
    assert len(got.replies) == 2 and grid.pulls == 9
    # pulls 0-5 empty: 10, 10, 20, 40, 80 ms then the 100 ms of a busy wait; pull 6 brings
    # a reply (reset)
    assert clock.sleeps == pytest.approx([0.01, 0.01, 0.02, 0.04, 0.08, 0.1, 0.01, 0.01])


def test_a_device_that_takes_a_minute_is_polled_about_a_hundred_times(monkeypatch) -> None:
    import fedslm.server.messaging as messaging

    clock = FakeClock()
    monkeypatch.setattr(messaging, "time", clock)
    grid = ScriptedGrid({})  # never answers: the phase ends at its deadline
    got = send_and_collect(grid, [instruction(1, 1)], timeout=60, label="r1")
    assert got.timed_out == [1]
    # 24 polls in the first 2 s, then x1.05 per poll to 20 s (47), then 1 Hz for 40 s:
    # polling at 10 Hz would have queried the SuperLink 600 times
    assert grid.pulls == 111 and max(clock.sleeps) == 1.0 and clock.now == 60
