"""Turn compressed client updates back into full adapters before screening.

A compressed reply carries the delta to the global the server sent
(``fedslm.compression``); replacing it by ``global + delta`` here means the screening
and Flower's strategies see exactly what an uncompressed client would have sent.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, RecordDict

from fedslm.compression import ARRAYS_KEY, INFO_KEY, CompressionError, decode_update
from fedslm.server.strategy import Screened


def decode_train_replies(replies: list[Message], reference: ArrayRecord) -> Screened:
    """Replies with compressed updates decoded in place; undecodable ones rejected."""
    accepted, rejected = [], {}
    for msg in replies:
        try:
            full = decode_update(msg.content, reference)
        except CompressionError as err:
            rejected[msg.metadata.src_node_id] = f"compressed update: {err}"
            continue
        if full is not None:
            content = RecordDict({k: v for k, v in msg.content.items() if k != INFO_KEY})
            content[ARRAYS_KEY] = full
            msg.content = content
        accepted.append(msg)
    return Screened(accepted, rejected)
