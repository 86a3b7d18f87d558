"""Screening every client reply, and bounding what an accepted one can do.

No reply can stop a run: each train, evaluate and status reply is accepted or rejected
with one line saying why (logged, and a ``rejected`` row in clients.csv), whatever its
records, keys, types and bytes. What reaches Flower's strategies is rebuilt from the
screened values only (the adapter in the server's dtype, the capped example count and
the keys a strategy reads), so Flower's consistency checks, which raise on any
difference between replies, always pass.

Bounded influence (``RobustConfig``, on by default): each accepted update's delta from
the global adapter is clipped to an L2 bound and each client's averaging weight capped
at a multiple of the round's median claim and, in simulation, at its partition's known
train size (``known_size_cap``); evaluate weights the same way, at the partition's known
test size.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from fedslm.config import RobustConfig
from fedslm.keys import PARTITION_ID
from fedslm.replies import (ARRAYS_KEY, BUDGET_EXHAUSTED, MAX_PARAM_ABS, METRICS_KEY,
                            STATUS_KEY, STATUS_RECORD, WEIGHT_KEY, metric_problem,
                            weight_problem)
from fedslm.wire import WireError, decode_array

# metrics a strategy reads besides the weight: DP-FedAvg's norm bit, and the partition id
# and device tier from which the LoRA wrapper decides ranks (fedslm.server.lora_aggregation)
STRATEGY_KEYS = (KEY_NORM_BIT, "partition-id", "tier-index")
NOTE_KEY = "screening"  # per-client text column: what bounding changed


@dataclass
class Screened:
    accepted: list[Message]
    rejected: dict[int, str] = field(default_factory=dict)  # node id -> why


def _screen(replies: Iterable[Message], problem) -> Screened:
    out = Screened([], {})
    for msg in replies:
        try:
            why = problem(msg)
        except Exception as err:  # noqa: BLE001 - the last line of defence: any reply
            why = f"unreadable reply ({type(err).__name__}: {str(err)[:100]})"
        if why is None:
            out.accepted.append(msg)
        else:
            out.rejected[msg.metadata.src_node_id] = why.splitlines()[0] if why else "rejected"
    return out


def _metrics_problem(content: RecordDict) -> str | None:
    if set(content.metric_records) != {METRICS_KEY}:
        return f"expected one metric record {METRICS_KEY!r}, got {sorted(content.metric_records)[:4]}"
    metrics = content.metric_records[METRICS_KEY]
    if (why := weight_problem(metrics.get(WEIGHT_KEY))) is not None:
        return why
    for key, value in metrics.items():
        if (why := metric_problem(key, value)) is not None:
            return why
    return None


def screen_train_replies(replies: list[Message], reference: ArrayRecord) -> Screened:
    """Keep only replies whose update could have come from an honest client.

    An update carries one adapter record and one metric record and nothing else; exactly
    the tensors the server sent, same shapes, same dtype (the server's, never a
    client's), finite values within ``MAX_PARAM_ABS``; a positive integer example count
    and metrics that pass ``fedslm.replies.metric_problem``.
    """
    expected = {name: (tuple(arr.shape), np.dtype(arr.dtype)) for name, arr in reference.items()}
    return _screen(replies, lambda msg: _train_problem(msg, expected))


def _train_problem(msg: Message, expected: dict[str, tuple[tuple[int, ...], np.dtype]]) -> str | None:
    if msg.has_error():
        return "reply carries an error"
    content = msg.content
    if ARRAYS_KEY not in content.array_records or METRICS_KEY not in content.metric_records:
        return "reply lacks adapter arrays or metrics"
    extra = sorted(set(content.keys()) - {ARRAYS_KEY, METRICS_KEY})
    if extra:
        return f"unexpected records {extra[:3]}"
    if (why := _metrics_problem(content)) is not None:
        return why
    arrays = content.array_records[ARRAYS_KEY]
    names = set(arrays.keys())
    if names != set(expected):
        extra, missing = sorted(names - set(expected)), sorted(set(expected) - names)
        return f"unexpected tensors {extra[:3]} / missing {missing[:3]}"
    for name, arr in arrays.items():
        shape, dtype = expected[name]
        if tuple(arr.shape) != shape:
            return f"tensor {name} has shape {tuple(arr.shape)}, expected {shape}"
        try:
            values = decode_array(arr, shape=shape)
        except WireError as err:
            return f"tensor {name}: {err}"
        if values.dtype != dtype:
            return f"tensor {name} has dtype {values.dtype}, expected {dtype} (the server's)"
        if not np.isfinite(values).all():
            return f"tensor {name} has non-finite values"
        if values.size and np.abs(values).max() > MAX_PARAM_ABS:
            return f"tensor {name} has a value beyond +-{MAX_PARAM_ABS:g}"
    return None


def screen_evaluate_replies(replies: list[Message]) -> Screened:
    """Evaluate replies: one metric record, a valid example count, every value a finite
    number in its range (lists only for ``fedslm.replies.LIST_METRICS``)."""
    return _screen(replies, _evaluate_problem)


def _evaluate_problem(msg: Message) -> str | None:
    if msg.has_error():
        return "reply carries an error"
    extra = sorted(set(msg.content.keys()) - {METRICS_KEY})
    if extra:
        return f"unexpected records {extra[:3]}"
    return _metrics_problem(msg.content)


def screen_status_replies(replies: list[Message]) -> Screened:
    """Replies carrying a status record (a DP-SGD client whose budget is spent) must be
    exactly a known status and valid metrics; other replies pass through untouched."""
    return _screen(replies, _status_problem)


def _status_problem(msg: Message) -> str | None:
    if msg.has_error() or STATUS_RECORD not in msg.content.config_records:
        return None
    status = msg.content.config_records[STATUS_RECORD]
    if status.get(STATUS_KEY) != BUDGET_EXHAUSTED:
        return f"unknown status {str(status.get(STATUS_KEY))[:40]!r}"
    if not isinstance(status.get("message", ""), str):
        return "status message is not text"
    extra = sorted(set(msg.content.keys()) - {STATUS_RECORD, METRICS_KEY})
    if extra:
        return f"unexpected records {extra[:3]} beside a status"
    if METRICS_KEY not in msg.content.metric_records:
        return None
    for key, value in msg.content.metric_records[METRICS_KEY].items():
        if (why := metric_problem(key, value)) is not None:
            return why
    return None


# ---- bounded influence -------------------------------------------------------------


def weight_cap(claims: list[int], multiple: float) -> int | None:
    """The largest weight a client may have this round: ``multiple`` times the median
    claim (at least 1); None when capping is off or there are no claims."""
    if multiple <= 0 or not claims:
        return None
    return max(1, math.floor(multiple * statistics.median(claims)))


def known_size_cap(metrics, known_sizes: Mapping[int, int]) -> int:
    """The most examples this client can have trained on: its reported partition's known
    train size, or the largest partition's when it reports none or an unknown one (a
    client misreporting its partition gains at most the largest partition's weight)."""
    pid = metrics.get(PARTITION_ID)
    if isinstance(pid, int) and not isinstance(pid, bool) and pid in known_sizes:
        return known_sizes[pid]
    return max(known_sizes.values())


def clip_bound(norms: list[float], robust: RobustConfig) -> float | None:
    """The round's L2 bound on an update's delta (None: no clipping)."""
    if robust.clip == "none" or not norms:
        return None
    if robust.clip == "fixed":
        return robust.clip_norm
    return robust.clip_multiple * statistics.median(norms)


@dataclass
class Bounded:
    replies: list[Message]  # what the strategy aggregates
    metrics: dict[str, float]  # per round: bound, fraction clipped, weight cap
    notes: dict[int, dict]  # node id -> per-client columns (norm, capped weight, note)


def bound_influence(replies: list[Message], reference: ArrayRecord | dict[int, ArrayRecord],
                    robust: RobustConfig, *, known_sizes: Mapping[int, int] | None = None) -> Bounded:
    """Screened train replies as the strategy should see them: each delta clipped to the
    round's bound, each weight capped, only the keys a strategy reads (see module doc).
    ``reference`` is the adapter sent, or per node id the adapter that node was sent
    (per-client ranks). ``known_sizes`` (simulation: partition id -> train examples)
    also caps each weight at ``known_size_cap`` while weight capping is on."""
    def ref_of(msg: Message) -> dict[str, np.ndarray]:
        sent = reference.get(msg.metadata.src_node_id) if isinstance(reference, dict) else reference
        return {k: v.numpy() for k, v in sent.items()}

    refs, deltas, claims, limits = [], [], [], []
    size_cap = bool(known_sizes) and robust.weight_cap > 0
    for msg in replies:
        arrays = msg.content.array_records[ARRAYS_KEY]
        ref = ref_of(msg)
        refs.append(ref)
        deltas.append({k: arrays[k].numpy().astype(np.float64) - ref[k] for k in ref})
        claims.append(int(msg.content.metric_records[METRICS_KEY][WEIGHT_KEY]))
        limits.append(known_size_cap(msg.content.metric_records[METRICS_KEY], known_sizes)
                      if size_cap else None)
    norms = [math.sqrt(sum(float(np.square(d).sum()) for d in delta.values())) for delta in deltas]
    bound, cap = clip_bound(norms, robust), weight_cap(claims, robust.weight_cap)
    keep = [k for k in STRATEGY_KEYS
            if replies and all(k in m.content.metric_records[METRICS_KEY] for m in replies)]
    out, notes, clipped, capped = [], {}, 0, 0
    for msg, ref, delta, norm, claim, limit in zip(replies, refs, deltas, norms, claims, limits):
        scale = 1.0 if bound is None or norm <= bound else bound / norm
        weight = min([claim, *(c for c in (cap, limit) if c is not None)])
        clipped, capped = clipped + (scale < 1), capped + (weight < claim)
        note = []
        if scale < 1:
            note.append(f"delta norm {norm:.4g} clipped to {bound:.4g}")
        if weight < claim:
            note.append(f"{WEIGHT_KEY} {claim} capped to {weight}")
        notes[msg.metadata.src_node_id] = {"update_norm": norm, WEIGHT_KEY: weight,
                                           **({NOTE_KEY: "; ".join(note)} if note else {})}
        arrays = {k: Array(np.asarray(ref[k] + scale * delta[k], dtype=ref[k].dtype)) for k in ref}
        metrics = MetricRecord({WEIGHT_KEY: weight, **{
            k: msg.content.metric_records[METRICS_KEY][k] for k in keep}})
        msg.content = RecordDict({ARRAYS_KEY: ArrayRecord(arrays), METRICS_KEY: metrics})
        out.append(msg)
    n = max(1, len(replies))
    metrics = {"robust_clipped_fraction": clipped / n, "robust_weights_capped": float(capped)}
    if bound is not None:
        metrics["robust_clip_bound"] = bound
    if cap is not None:
        metrics["robust_weight_cap"] = float(cap)
    if norms:
        metrics["robust_update_norm_median"] = statistics.median(norms)
    return Bounded(out, metrics, notes)


def cap_evaluate_weights(rows: list[dict], multiple: float, *,
                         known_sizes: Mapping[int, int] | None = None) -> int | None:
    """Cap each evaluate row's example count in place (the weight of its metrics in the
    round's means) at ``multiple`` times the round's median claim and, with
    ``known_sizes`` (simulation: partition id -> evaluate examples), at ``known_size_cap``;
    the claim is kept in the row's note. Returns the median cap (None: capping off)."""
    cap = weight_cap([int(r[WEIGHT_KEY]) for r in rows if WEIGHT_KEY in r], multiple)
    if cap is None:
        return None
    for row in rows:
        if WEIGHT_KEY not in row:
            continue
        limit = min(cap, known_size_cap(row, known_sizes)) if known_sizes else cap
        if row[WEIGHT_KEY] > limit:
            row[NOTE_KEY] = f"{WEIGHT_KEY} {row[WEIGHT_KEY]} capped to {limit}"
            row[WEIGHT_KEY] = limit
    return cap


def for_flower_evaluate(replies: list[Message], rows: list[dict]) -> list[Message]:
    """Evaluate replies Flower's ``aggregate_evaluate`` accepts: the scalar keys every
    reply has, with the capped weights of ``rows`` (Flower raises on differing keys)."""
    if not replies:
        return []
    common = set.intersection(*(set(m.content.metric_records[METRICS_KEY].keys()) for m in replies))
    weights = {r["node_id"]: r[WEIGHT_KEY] for r in rows}
    out = []
    for msg in replies:
        metrics = msg.content.metric_records[METRICS_KEY]
        kept = {k: metrics[k] for k in sorted(common) if not isinstance(metrics[k], list)}
        kept[WEIGHT_KEY] = weights.get(msg.metadata.src_node_id, kept[WEIGHT_KEY])
        msg.content = RecordDict({METRICS_KEY: MetricRecord(kept)})
        out.append(msg)
    return out
