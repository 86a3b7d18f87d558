"""The work behind the ClientApp's handlers: unpack the message, call the plain task
function, pack the reply.

Only adapter tensors (the ``shared`` role of ``fedslm.adapters.parameter_role``), or
their compressed delta (``fedslm.compression``), and scalar metrics leave the client;
base weights, text and personal tensors never do. A DP-SGD client whose budget is spent
replies with a status record and its epsilon instead of an update. Where this client's
data and state live is decided once, by ``fedslm.client.node``.

``fedslm.client.app`` imports this module in a background thread once a Ray worker has
loaded the app, so that loading the app does not wait for torch; a SuperNode's
``flwr-clientapp`` (one process per message) imports it with its train or evaluate message.
"""

from __future__ import annotations

import functools

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedslm.client import attack
from fedslm.client.node import record_participation, this_node
from fedslm.client.privacy import BudgetExhausted
from fedslm.client.task import evaluate, fit
from fedslm.adapters import from_array_record
from fedslm.aggregation.lora_factors import fit_to_shapes, pad, shapes_of
from fedslm.aggregation.ranks import tier_metrics
from fedslm.compression import RESIDUAL_FILE, update_records
from fedslm.config import ExperimentConfig
from fedslm.keys import (ARRAYS_KEY, BUDGET_EXHAUSTED, CONFIG_KEY, METRICS_KEY, PROXIMAL_MU,
                         SERVER_ROUND, STATUS_KEY, STATUS_RECORD)


@functools.lru_cache(maxsize=None)
def use_threads(n: int) -> None:
    """Torch threads for this worker: ``federation.client_num_cpus`` (set once per value)."""
    torch.set_num_threads(max(1, n))


def train_reply(cfg: ExperimentConfig, msg: Message, context: Context) -> Message:
    use_threads(int(cfg.federation.client_num_cpus))
    config, me = msg.content[CONFIG_KEY], this_node(cfg, context, msg)
    server_round = int(config[SERVER_ROUND])
    received = from_array_record(msg.content[ARRAYS_KEY])
    try:
        # per-client ranks (fedslm.aggregation.ranks): train the sent rank, zero-padded
        # into the model's rank peft.r, and send back exactly the shapes received
        arrays, metrics = fit(cfg, pad(received, cfg.peft.r), partition_id=me.partition_id,
                              server_round=server_round,
                              proximal_mu=float(config.get(PROXIMAL_MU, 0.0)),
                              client_dir=me.state_dir, data_path=me.data_path,
                              attack_round=attack.data_attack_round(cfg.attack, context.node_config,
                                                                    server_round))  # simulation only
    except BudgetExhausted as exc:  # a clear status instead of an update, not an error
        record_participation(me.participation_log, run_id=context.run_id,
                             server_round=server_round, phase="refused", metrics=exc.metrics)
        status = ConfigRecord({STATUS_KEY: BUDGET_EXHAUSTED, "message": str(exc)})
        return Message(RecordDict({METRICS_KEY: MetricRecord(exc.metrics), STATUS_RECORD: status}),
                       reply_to=msg)
    arrays = fit_to_shapes(arrays, shapes_of(received))
    metrics.update(tier_metrics(cfg.peft.ranks, context.node_config))  # peft.ranks by device tier
    record_participation(me.participation_log, run_id=context.run_id, server_round=server_round,
                         phase="train", metrics=metrics)
    arrays, metrics = attack.apply(cfg.attack, context.node_config, arrays, received, metrics,
                                   partition_id=me.partition_id, server_round=server_round,
                                   num_clients=cfg.federation.num_clients)  # simulation only
    residual = (me.state_dir / RESIDUAL_FILE
                if cfg.compression.method != "none" and cfg.compression.error_feedback else None)
    update = update_records(arrays, received, method=cfg.compression.method, residual_path=residual,
                            run_id=context.run_id)
    return Message(RecordDict({**update, METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)


def evaluate_reply(cfg: ExperimentConfig, msg: Message, context: Context) -> Message:
    use_threads(int(cfg.federation.client_num_cpus))
    me = this_node(cfg, context, msg)
    server_round = int(msg.content[CONFIG_KEY].get(SERVER_ROUND, 0))
    metrics = evaluate(cfg, from_array_record(msg.content[ARRAYS_KEY]),
                       partition_id=me.partition_id, server_round=server_round,
                       client_dir=me.state_dir, data_path=me.data_path)
    metrics.update(tier_metrics(cfg.peft.ranks, context.node_config))
    record_participation(me.participation_log, run_id=context.run_id, server_round=server_round,
                         phase="evaluate", metrics=metrics)
    return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)
