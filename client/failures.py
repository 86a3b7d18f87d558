"""What a client tells the server when its handler fails, and what it keeps to itself.

Flower turns a ClientApp exception into an error reply whose reason is the exception's
text; in simulation Ray then wraps it (``RayTaskError(ClientAppException)`` and a
traceback), so the operator never sees the real ``LedgerError``, while on a device the
same text (local paths, possibly raw data) would leave the device. This mod answers
instead, in one line:

- in simulation (operator and clients are the same person): ``<class>: <message>``;
- on a device (``state-dir`` in its node config): ``<class>: <reason code>`` from a fixed
  table, never free text, and the full message and traceback go to the device's own log.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

log = logging.getLogger("fedslm.client")

# Exception class name -> the reason code a device sends; anything else is "client-error".
REASON_CODES = {
    "LedgerError": "privacy-ledger-unusable",
    "PersonalStateError": "personal-state-unusable",
    "CompressionError": "compression-state-unusable",
    "DataError": "local-data-unusable",
    "ModelError": "base-model-unusable",
    "AdapterError": "adapter-mismatch",
    "WireError": "malformed-message",
    "ConfigError": "bad-run-config",
    "PermissionError": "local-file-permission",
    "FileNotFoundError": "local-file-missing",
    "OSError": "local-io-error",
    "MemoryError": "out-of-memory",
    "OutOfMemoryError": "out-of-memory",
}
DEFAULT_CODE = "client-error"


def on_device(context: Context) -> bool:
    return bool(context.node_config.get("state-dir"))


def failure_reason(exc: BaseException, *, device: bool) -> str:
    """The one line the server receives for ``exc``."""
    name = type(exc).__name__
    if device:
        return f"{name}: {REASON_CODES.get(name, DEFAULT_CODE)}"
    lines = str(exc).strip().splitlines()
    return f"{name}: {lines[0]}" if lines else name


def failure_report_mod(msg: Message, context: Context, call_next) -> Message:
    """Outermost mod of every handler: an exception becomes an error reply with
    ``failure_reason``; on a device the details stay in the local log."""
    try:
        return call_next(msg, context)
    except Exception as exc:  # reported, not raised: Flower would send its own text
        device = on_device(context)
        if device:
            log.exception("round message %s failed (the server gets only %r)",
                          msg.metadata.message_id, failure_reason(exc, device=True))
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                             reason=failure_reason(exc, device=device)), reply_to=msg)
