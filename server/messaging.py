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
from flwr.serverapp import Grid

POLL_SECONDS = 0.1


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
    pending_dst: dict[str, int] = {}
    for msg_id, msg in zip(grid.push_messages(messages), messages):
        pending_dst[msg_id] = msg.metadata.dst_node_id
    total = len(pending_dst)
    deadline = start + timeout
    while pending_dst and time.monotonic() < deadline:
        got = list(grid.pull_messages(list(pending_dst)))
        for reply in got:
            src = pending_dst.pop(reply.metadata.reply_to_message_id, None)
            if src is None:
                continue
            result.replies.append(reply)
            if reply.has_error():
                result.failed[src] = reply.error.reason
        if got:
            done = total - len(pending_dst)
            log(INFO, "%s: %d/%d clients done", label, done, total)
            if on_progress:
                on_progress(done, total)
        if pending_dst:
            time.sleep(POLL_SECONDS)
    result.timed_out = sorted(pending_dst.values())
    if result.timed_out:
        log(INFO, "%s: %d client(s) missed the %.0fs deadline: %s", label,
            len(result.timed_out), timeout, result.timed_out)
    result.seconds = time.monotonic() - start
    return result
