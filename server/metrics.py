"""Per-client rows and per-round summaries from fedslm.client replies.

FedAvg's own metric aggregation keeps only a weighted mean; an operator also wants the
spread over clients and who reported what, so the round loop keeps every client's row.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from flwr.app import Message

from fedslm.keys import METRICS_KEY, PARTITION_ID, WEIGHT_KEY

if TYPE_CHECKING:
    from fedslm.tasks.base import Task

BOOKKEEPING = {WEIGHT_KEY, PARTITION_ID, "status", "error", "tier-index"}
SPREAD_KEYS = {"loss", "perplexity"}
DP_PREFIX = "dp-"  # privacy figures: summarized by fedslm.server.privacy_rounds, not averaged here


def client_rows(phase: str, server_round: int, replies: Iterable[Message]) -> list[dict]:
    """One row per replying client: round, phase, node id, and its reported metrics."""
    rows = []
    for msg in replies:
        if msg.has_error() or METRICS_KEY not in msg.content.metric_records:
            continue
        metrics = dict(msg.content.metric_records[METRICS_KEY])
        rows.append({"round": server_round, "phase": phase,
                     "node_id": msg.metadata.src_node_id, "status": "ok", **metrics})
    return rows


def dropped_rows(phase: str, server_round: int, *, failed: dict[int, str],
                 timed_out: list[int], rejected: dict[int, str]) -> list[dict]:
    """One row per client that was asked but did not count: who, and why.

    ``failed``: the client (or Flower on its behalf, e.g. node unavailable) replied with
    an error; ``timed_out``: no reply before the round deadline; ``rejected``: the update
    failed screening. These rows go to clients.csv, never into the averages.
    """
    rows = []
    for status, reasons in (("failed", failed), ("timed_out", dict.fromkeys(timed_out, "")),
                            ("rejected", rejected)):
        for node_id, reason in sorted(reasons.items()):
            first_line = (reason or "").strip().splitlines()[0] if (reason or "").strip() else ""
            rows.append({"round": server_round, "phase": phase, "node_id": node_id,
                         "status": status, "error": first_line[:200]})
    return rows


def summarize(rows: list[dict], prefix: str, *, task: Task | None = None,
              class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Weighted means (by num-examples) of every numeric metric, plus min/median/max of
    loss and perplexity over clients. ``{prefix}perplexity`` is exp of the weighted mean
    loss, i.e. the perplexity of the pooled test tokens, not a mean of perplexities.
    The task's exactly pooled metrics (``Task.pooled``: F1 from the summed confusion
    matrices, ROUGE-L over all generations) replace the means of the same names, and so
    do the personal model's (``personal_*``) when clients report one."""
    if not rows:
        return {}
    weights = [float(r.get(WEIGHT_KEY, 1)) for r in rows]
    total = sum(weights) or 1.0
    keys = sorted({k for r in rows for k, v in r.items()
                   if isinstance(v, (int, float)) and k not in BOOKKEEPING
                   and k not in ("round", "node_id") and not k.startswith(DP_PREFIX)})
    out: dict[str, float] = {}
    for key in keys:
        pairs = [(float(r[key]), w) for r, w in zip(rows, weights) if key in r]
        if not pairs:
            continue
        out[f"{prefix}{key}"] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
        if key in SPREAD_KEYS:
            values = [v for v, _ in pairs]
            out[f"{prefix}{key}_min"] = min(values)
            out[f"{prefix}{key}_median"] = statistics.median(values)
            out[f"{prefix}{key}_max"] = max(values)
    if f"{prefix}loss" in out and (task is None or "perplexity" in task.report_keys):
        out[f"{prefix}perplexity"] = math.exp(min(out[f"{prefix}loss"], 50.0))
    if task is not None:
        out.update({f"{prefix}{k}": v for k, v in task.pooled(rows, class_names).items()})
        personal = [{k.removeprefix("personal_"): v for k, v in r.items() if k.startswith("personal_")}
                    for r in rows]
        out.update({f"{prefix}personal_{k}": v for k, v in task.pooled(personal, class_names).items()})
    out[f"{prefix}clients"] = float(len(rows))
    out[f"{prefix}examples"] = total
    return out
