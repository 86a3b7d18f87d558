"""Push messages to SuperNodes and collect replies with progress, a deadline and a record
of who did not answer.

Flower's ``Grid.send_and_receive`` sleeps 3 s between polls and says nothing until every
reply is in; a round of a tiny model takes less than that, and an operator wants to see
clients come in and know which ones dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO

from flwr.app import Message
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

# Polls start fast after each reply and back off while nothing arrives: the pause doubles
# from FIRST_POLL to BUSY_POLL (a reply that lands just after a poll waits ~10 ms, not up
# to 100 ms, in a simulated round of a tiny model), and past 2 s of waiting it is a
# twentieth of the time waited, at most LAST_POLL: a reply then waits at most ~5 % longer
# than it took, and a device round of 30 s is polled ~80 times, not 300 times at 10 Hz
# (each poll of a deployed SuperLink is a query of its database).
FIRST_POLL = 0.01
BUSY_POLL = 0.1
POLL_FRACTION = 0.05
LAST_POLL = 1.0


def poll_pause(since_reply: float) -> float:
    """Seconds to sleep before the next poll, ``since_reply`` seconds after the last reply
    (or the push): as long as that (the pause doubles) between FIRST_POLL and BUSY_POLL,
    then POLL_FRACTION of it up to LAST_POLL."""
    return min(LAST_POLL, max(FIRST_POLL, min(since_reply, BUSY_POLL), POLL_FRACTION * since_reply))


# Error replies the SuperLink makes for a task whose TTL (= the deadline) ran out: the
# node did not answer in time, which is a timeout, not a failure of the client.
EXPIRED = {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}


@dataclass
class Collected:
    """Replies of one phase, plus the nodes that sent an error or never answered."""

    replies: list[Message] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # node id -> reason
    timed_out: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> list[Message]:
        return [m for m in self.replies if not m.has_error()]


def send_and_collect(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float,
    label: str,
    on_progress: Callable[[int, int], None] | None = None,
) -> Collected:
    """Send ``messages`` and wait for their replies until all are in or ``timeout``."""
    messages = list(messages)
    start = time.monotonic()
    result = Collected()
    if not messages:
        return result
    for msg in messages:
        # The task is void after the deadline: the SuperLink no longer hands it to a node
        # that has not pulled it yet, so a straggler skips it and rejoins the next round.
        msg.metadata.ttl = timeout
    pending_dst: dict[str, int] = {}
    expired: list[int] = []
    for msg_id, msg in zip(grid.push_messages(messages), messages):
        if msg_id is None:  # the SuperLink refused this one message
            result.failed[msg.metadata.dst_node_id] = "message could not be pushed"
            continue
        pending_dst[msg_id] = msg.metadata.dst_node_id
    total = len(pending_dst)
    deadline = start + timeout
    last_reply = time.monotonic()
    while pending_dst and time.monotonic() < deadline:
        got = list(grid.pull_messages(list(pending_dst)))
        for reply in got:
            # Replies are matched by the id of the message they answer, and only this
            # phase's ids are pulled: a late reply to an earlier round can never be
            # taken for one of this round's.
            src = pending_dst.pop(reply.metadata.reply_to_message_id, None)
            if src is None:
                continue
            result.replies.append(reply)
            if reply.has_error() and reply.error.code in EXPIRED:
                expired.append(src)  # the SuperLink voided the task at its deadline
            elif reply.has_error():
                result.failed[src] = reply.error.reason
        if got:
            last_reply = time.monotonic()
            done = total - len(pending_dst)
            log(INFO, "%s: %d/%d clients done", label, done, total)
            if on_progress:
                on_progress(done, total)
        if pending_dst:
            now = time.monotonic()
            time.sleep(max(0.0, min(poll_pause(now - last_reply), deadline - now)))
    result.timed_out = sorted([*pending_dst.values(), *expired])
    if result.timed_out:
        log(INFO, "%s: %d client(s) missed the %.0fs deadline: %s", label,
            len(result.timed_out), timeout, result.timed_out)
    result.seconds = time.monotonic() - start
    return result
