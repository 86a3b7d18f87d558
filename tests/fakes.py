"""Shared test fakes: hand-built Flower messages and grids, like Flower's own
``strategy_utils_test.create_mock_reply``. Every test that drives a strategy, the round
loop, the collector or a ClientApp handler builds its messages here, so a change in
Flower's Message API is fixed once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

SERVER = 0


def arrays(values: ArrayRecord | Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord from named numpy arrays (an ArrayRecord is passed through)."""
    if isinstance(values, ArrayRecord):
        return values
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})


def reply(
    node: int,
    content: RecordDict | None = None,
    *,
    error: Error | None = None,
    kind: str = "train",
    reply_to: str = "q",
    message_id: str | None = None,
    group_id: str = "1",
    created_at: float = 0.0,
) -> Message:
    """A client's reply from ``node`` (content, or an error) to message ``reply_to``."""
    metadata = Metadata(
        run_id=1,
        message_id=message_id if message_id is not None else f"m{node}",
        src_node_id=node,
        dst_node_id=SERVER,
        reply_to_message_id=reply_to,
        group_id=group_id,
        created_at=created_at,
        ttl=60.0,
        message_type=kind,
    )
    if error is not None:
        return make_message(metadata, error=error)
    return make_message(metadata, content if content is not None else RecordDict())


def train_reply(
    node: int,
    values: ArrayRecord | Mapping[str, np.ndarray],
    *,
    num_examples: int | None = 10,
    extra: Mapping[str, RecordDict | ConfigRecord] | None = None,
    **metrics: float,
) -> Message:
    """A training reply: the adapter in ``arrays``, ``num-examples`` (omitted when None)
    and any other metrics in ``metrics``; ``extra`` adds further records."""
    record = {"num-examples": num_examples} if num_examples is not None else {}
    content = RecordDict({"arrays": arrays(values), "metrics": MetricRecord({**record, **metrics}), **(extra or {})})
    return reply(node, content)


def instruction(
    node: int,
    content: RecordDict,
    *,
    kind: str = "train",
    message_id: str = "m1",
    group_id: str = "1",
    created_at: float = 0.0,
    ttl: float = 600.0,
) -> Message:
    """A message from the server to ``node`` (what a ClientApp handler receives)."""
    metadata = Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=SERVER,
        dst_node_id=node,
        reply_to_message_id="",
        group_id=group_id,
        created_at=created_at,
        ttl=ttl,
        message_type=kind,
    )
    return make_message(metadata, content)


def round_content(values: ArrayRecord | Mapping[str, np.ndarray] | None, server_round: int) -> RecordDict:
    """What the server sends in a round: the global adapter and the round number."""
    config = {"config": ConfigRecord({"server-round": server_round})}
    return RecordDict({**({"arrays": arrays(values)} if values is not None else {}), **config})


class NodesGrid:
    """What a strategy's ``configure_*`` asks of a Grid: the connected node ids."""

    def __init__(self, n: int | Iterable[int]) -> None:
        self.nodes = list(range(1, n + 1)) if isinstance(n, int) else list(n)

    def get_node_ids(self) -> list[int]:
        return self.nodes
