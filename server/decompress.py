"""Turn compressed client updates back into full adapters before screening.

A compressed reply carries the delta to the global the server sent
(``fedslm.compression``); replacing it by ``global + delta`` here means the screening
and Flower's strategies see exactly what an uncompressed client would have sent.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, RecordDict

from fedslm.compression import ARRAYS_KEY, INFO_KEY, CompressionError, decode_update
from fedslm.server.screening import Screened


def decode_train_replies(replies: list[Message], reference: ArrayRecord,
                         method: str | None = None) -> Screened:
    """Replies with compressed updates decoded in place; undecodable ones rejected, and,
    when the configured ``method`` is given, any reply not sent with it."""
    accepted, rejected = [], {}
    for msg in replies:
        try:
            info = msg.content.config_records.get(INFO_KEY)
            sent = "none" if info is None else str(info.get("method"))
            if method is not None and sent != method:
                raise CompressionError(f"sent as {sent[:20]!r}, the server expects {method!r}")
            full = decode_update(msg.content, reference)
        except CompressionError as err:
            rejected[msg.metadata.src_node_id] = f"compressed update: {err}"
            continue
        except Exception as err:  # noqa: BLE001 - no reply may stop the round
            rejected[msg.metadata.src_node_id] = (f"compressed update unreadable "
                                                  f"({type(err).__name__}: {str(err)[:100]})")
            continue
        if full is not None:
            content = RecordDict({k: v for k, v in msg.content.items() if k != INFO_KEY})
            content[ARRAYS_KEY] = full
            msg.content = content
        accepted.append(msg)
    return Screened(accepted, rejected)
