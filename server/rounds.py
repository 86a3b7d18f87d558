"""The federated round loop: Flower's strategy decides whom to ask and how to aggregate;
this loop adds progress, deadlines, screening of updates, communication accounting,
per-client metrics and a hook to checkpoint after each round.

It follows ``Strategy.start`` step for step (configure -> send -> aggregate, then
evaluate), so any Flower strategy plugs in unchanged.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedslm.adapters import payload_bytes
from fedslm.config import RobustConfig
from fedslm.keys import ARRAYS_KEY
from fedslm.server.decompress import decode_train_replies
from fedslm.server.messaging import send_and_collect
from fedslm.server.metrics import client_rows, dropped_rows, summarize
from fedslm.server.screening import (Screened, bound_influence, cap_evaluate_weights,
                                     for_flower_evaluate, screen_evaluate_replies,
                                     screen_status_replies, screen_train_replies)
from fedslm.tasks.base import Task

if TYPE_CHECKING:
    from fedslm.server.privacy_rounds import RoundPrivacy
    from fedslm.server.secagg_round import SecureTrain

CentralEval = Callable[[int, ArrayRecord], dict[str, float]]
RoundHook = Callable[[int, ArrayRecord, dict[str, float], list[dict]], None]


@dataclass
class RoundPlan:
    """What the loop needs besides the strategy: rounds, deadline, configs, callbacks."""

    num_rounds: int
    timeout: float
    train_config: ConfigRecord = field(default_factory=ConfigRecord)
    evaluate_config: ConfigRecord = field(default_factory=ConfigRecord)
    central_eval: CentralEval | None = None
    on_round_end: RoundHook | None = None
    privacy: RoundPrivacy | None = None  # refusals, DP metrics, budget stop (fedslm.server.privacy_rounds)
    # Extra per-round metrics from the round's evaluate rows (e.g. per-client spreads of
    # personalized vs global quality); merged into the round's metrics before logging.
    round_metrics: Callable[[int, list[dict]], dict[str, float]] | None = None
    initial_evaluation: bool = True
    task: Task | None = None  # pools the task's statistics exactly (e.g. summed confusion)
    class_names: list[str] | None = None
    secure: SecureTrain | None = None  # SecAgg+ replaces the train phase (fedslm.server.secagg_round)
    robust: RobustConfig = field(default_factory=RobustConfig)  # bounded influence (on)
    known_sizes: Mapping[int, int] | None = None  # simulation: partition id -> train examples (cap)
    known_test_sizes: Mapping[int, int] | None = None  # simulation: partition id -> evaluate examples
    compression: str | None = None  # the configured method; None accepts any (tests)


class NoTrainingError(RuntimeError):
    """Not one client update arrived in time: the run must not end as a success."""


@dataclass
class History:
    rounds: list[dict[str, float]] = field(default_factory=list)
    clients: list[dict] = field(default_factory=list)


def evaluate_phase(grid: Grid, strategy: Strategy, plan: RoundPlan, server_round: int,
                   arrays: ArrayRecord) -> tuple[dict[str, float], list[dict]]:
    """Federated evaluation of ``arrays`` on the clients' own test splits (+ central)."""
    label = f"[round {server_round}/{plan.num_rounds}] evaluate"
    messages = list(strategy.configure_evaluate(server_round, arrays, plan.evaluate_config, grid))
    got = send_and_collect(grid, messages, timeout=plan.timeout, label=label)
    screened = screen_evaluate_replies(got.ok)
    _log_rejected(label, screened.rejected)
    rows = client_rows("evaluate", server_round, screened.accepted)
    cap = cap_evaluate_weights(rows, plan.robust.weight_cap, known_sizes=plan.known_test_sizes)
    strategy.aggregate_evaluate(server_round, for_flower_evaluate(screened.accepted, rows))
    metrics = summarize(rows, "eval_", task=plan.task, class_names=plan.class_names)
    if cap is not None:
        metrics["robust_eval_weight_cap"] = float(cap)
    rows += dropped_rows("evaluate", server_round, failed=got.failed, timed_out=got.timed_out,
                         rejected=screened.rejected)
    metrics["eval_clients_rejected"] = float(len(screened.rejected))
    metrics["bytes_down_eval"] = float(sum(_sent_bytes(m) for m in messages))
    metrics["eval_clients_dropped"] = float(len(got.failed) + len(got.timed_out))
    if plan.central_eval is not None:
        metrics.update(plan.central_eval(server_round, arrays))
    if plan.round_metrics is not None:
        metrics.update(plan.round_metrics(server_round, rows))
    if plan.privacy is not None:  # finetune under DP-SGD spends budget at evaluation
        metrics.update(plan.privacy.evaluate_metrics(rows))
    return metrics, rows


def train_phase(grid: Grid, strategy: Strategy, plan: RoundPlan, server_round: int,
                arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, float], list[dict]]:
    """One round of federated training; returns the new global adapter."""
    if plan.secure is not None:
        return plan.secure.train_phase(grid, strategy, plan, server_round, arrays)
    label = f"[round {server_round}/{plan.num_rounds}] train"
    messages = list(strategy.configure_train(server_round, arrays, plan.train_config, grid))
    got = send_and_collect(grid, messages, timeout=plan.timeout, label=label)
    status = screen_status_replies(got.ok)  # refusals must be well-formed too
    replies, refused = (plan.privacy.split_refusals(status.accepted) if plan.privacy
                        else (status.accepted, []))
    replies, ledger_rejected = plan.privacy.check_ledgers(replies) if plan.privacy else (replies, {})
    wire_bytes = {id(m): _wire_bytes(m) for m in replies}
    sent = sent_adapters(messages)
    screened = screen_against_sent(replies, sent, plan.compression)
    screened.rejected.update(status.rejected)
    screened.rejected.update(ledger_rejected)
    _log_rejected(label, screened.rejected)
    for node, why in got.failed.items():
        log(WARNING, "%s: node %s failed: %s", label, node, why.splitlines()[0] if why else "")
    rows = client_rows("train", server_round, screened.accepted)
    bounded = bound_influence(screened.accepted, sent, plan.robust, known_sizes=plan.known_sizes)
    for row in rows:
        row.update(bounded.notes.get(row["node_id"], {}))
    aggregate_start = time.perf_counter()
    new_arrays, _ = strategy.aggregate_train(server_round, bounded.replies)
    aggregate_seconds = time.perf_counter() - aggregate_start
    columns = getattr(strategy, "client_columns", {})  # per client, e.g. FLTrust's trust
    for row in rows:
        row.update(columns.get(row["node_id"], {}))
    metrics = summarize(rows, "train_")
    metrics.update(bounded.metrics)
    rows += dropped_rows("train", server_round, failed=got.failed, timed_out=got.timed_out,
                         rejected=screened.rejected)
    metrics.update(
        bytes_down=float(sum(_sent_bytes(m) for m in messages)),
        server_aggregate_seconds=aggregate_seconds,
        **getattr(strategy, "aggregation_metrics", {}),
        bytes_up=float(sum(wire_bytes[id(m)] for m in screened.accepted)),
        clients_sampled=float(len(messages)),
        clients_failed=float(len(got.failed)),
        clients_timed_out=float(len(got.timed_out)),
        clients_rejected=float(len(screened.rejected)),
    )
    if plan.privacy is not None:
        metrics.update(plan.privacy.round_metrics(server_round, rows, refused))
        rows += client_rows("refused", server_round, refused)
    if new_arrays is None:
        log(WARNING, "%s: no usable update; the global adapter is unchanged", label)
        new_arrays = arrays
    # the global adapter keeps the server's names and dtypes, whatever the strategy did
    new_arrays = ArrayRecord({k: Array(np.asarray(new_arrays[k].numpy(), dtype=arrays[k].numpy().dtype))
                              for k in arrays.keys()})
    return new_arrays, metrics, rows


def _sent_bytes(msg: Message) -> int:
    records = msg.content.array_records
    return payload_bytes(records[ARRAYS_KEY]) if ARRAYS_KEY in records else 0


def sent_adapters(messages: list[Message]) -> dict[int, ArrayRecord]:
    """The adapter each node was sent (per-client ranks make them differ between clients)."""
    return {m.metadata.dst_node_id: m.content.array_records[ARRAYS_KEY] for m in messages
            if ARRAYS_KEY in m.content.array_records}


def screen_against_sent(replies: list[Message], sent: dict[int, ArrayRecord],
                        compression: str | None = None) -> Screened:
    """Decode (compressed deltas -> full adapters; only the configured ``compression``)
    and screen each reply against exactly the adapter its node was sent."""
    accepted, rejected = [], {}
    for msg in replies:
        reference = sent.get(msg.metadata.src_node_id)
        if reference is None:
            rejected[msg.metadata.src_node_id] = "reply from a node that was sent no adapter"
            continue
        decoded = decode_train_replies([msg], reference, compression)
        screened = screen_train_replies(decoded.accepted, reference)
        accepted += screened.accepted
        rejected.update(decoded.rejected)
        rejected.update(screened.rejected)
    return Screened(accepted, rejected)


def _wire_bytes(msg) -> int:
    try:
        return payload_bytes(msg.content.array_records[ARRAYS_KEY])
    except Exception:  # noqa: BLE001 - a malformed reply is rejected by screening
        return 0


def _log_rejected(label: str, rejected: dict[int, str]) -> None:
    for node, why in rejected.items():
        log(WARNING, "%s: rejected reply from node %s: %s", label, node, why)


def freeze_startup_objects() -> int:
    """Leave what exists before the first round out of Python's full garbage collections.

    A full collection walks every tracked object: with torch, transformers and Flower
    loaded that is ~400,000 objects and 0.05-1 s on a busy 2-core machine, and it lands
    wherever the allocation count runs out, e.g. inside screening a reply (the fuzz
    benchmark's slowest cases were all one). Modules, the model and caches live for the
    whole run anyway; what rounds create is still collected (``gc.freeze``, after one
    collection of today's garbage). Returns how many objects are frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def run_rounds(grid: Grid, strategy: Strategy, plan: RoundPlan, arrays: ArrayRecord,
               *, first_round: int = 1, log_metrics: Callable[[dict, int], None],
               history: History | None = None) -> tuple[ArrayRecord, History]:
    """Rounds ``first_round..num_rounds``; round 0 (before training) is evaluated too
    when starting fresh (unless ``plan.initial_evaluation`` is off), so every curve has
    its starting point."""
    history = history or History()
    trained = first_round > 1  # a resumed run trained before
    if first_round == 1 and plan.initial_evaluation:
        metrics, rows = evaluate_phase(grid, strategy, plan, 0, arrays)
        _record(history, 0, metrics, rows, log_metrics, plan.num_rounds)
    for rnd in range(first_round, plan.num_rounds + 1):
        if plan.privacy is not None and (why := plan.privacy.stop_reason(rnd)):
            log(WARNING, "[round %d/%d] stopping: %s", rnd, plan.num_rounds, why)
            break
        if plan.secure is not None and (why := plan.secure.stop_reason()):
            log(WARNING, "[round %d/%d] stopping: %s", rnd, plan.num_rounds, why)
            break
        start = time.monotonic()
        arrays, train_metrics, train_rows = train_phase(grid, strategy, plan, rnd, arrays)
        trained = trained or any(r.get("status") == "ok" for r in train_rows if r["phase"] == "train")
        sampled = train_metrics.get("clients_sampled", 0)
        if not trained and sampled > 0 and train_metrics.get("clients_timed_out", 0) == sampled:
            raise NoTrainingError(
                f"federation.round_timeout: all {train_metrics['clients_sampled']:.0f} clients of "
                f"round {rnd} missed the {plan.timeout:g}s deadline and none has trained yet; "
                "no client can meet it, so the run stops instead of finishing untrained")
        eval_metrics, eval_rows = evaluate_phase(grid, strategy, plan, rnd, arrays)
        metrics = {**train_metrics, **eval_metrics, "round_seconds": time.monotonic() - start}
        metrics["bytes_down"] += metrics.pop("bytes_down_eval")
        _record(history, rnd, metrics, train_rows + eval_rows, log_metrics, plan.num_rounds)
        if plan.on_round_end is not None:
            plan.on_round_end(rnd, arrays, metrics, train_rows + eval_rows)
    return arrays, history


def _record(history: History, rnd: int, metrics: dict[str, float], rows: list[dict],
            log_metrics: Callable[[dict, int], None], total: int) -> None:
    history.rounds.append({"round": rnd, **metrics})
    history.clients.extend(rows)
    log_metrics(metrics, rnd)
    parts = [f"[round {rnd}/{total}]"]
    for key, fmt in (("train_loss", "train loss {:.4f}"), ("eval_loss", "eval loss {:.4f}"),
                     ("eval_perplexity", "ppl {:.2f}"), ("eval_accuracy", "acc {:.3f}"),
                     ("eval_macro_f1", "macro-F1 {:.3f}"), ("eval_rouge_l", "ROUGE-L {:.3f}"),
                     ("central_loss", "central loss {:.4f}"),
                     ("round_seconds", "{:.1f}s")):
        if key in metrics:
            parts.append(fmt.format(metrics[key]))
    log(INFO, " | ".join(parts))
