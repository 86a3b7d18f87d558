"""The work behind the ClientApp's handlers: unpack the message, call the plain task
function, pack the reply.

Only adapter tensors (the ``shared`` role of ``fedslm.adapters.parameter_role``), or
their compressed delta (``fedslm.compression``), and scalar metrics leave the client;
base weights, text and personal tensors never do. A DP-SGD client whose budget is spent
replies with a status record and its epsilon instead of an update. Where this client's
data and state live is decided once, by ``client.node``.

``client.app`` imports this module in a background thread once Flower has loaded the app,
so that loading the app does not wait for torch.
"""

from __future__ import annotations

import functools

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import attack
from client.node import NodeSetup, node_setup, record_participation
from client.personal_state import resolve_state_dir
from client.privacy import BUDGET_EXHAUSTED, STATUS_KEY, STATUS_RECORD, BudgetExhausted
from client.task import evaluate, fit
from fedslm.adapters import from_array_record
from fedslm.compression import RESIDUAL_FILE, update_records
from fedslm.config import ExperimentConfig


@functools.lru_cache(maxsize=None)
def use_threads(n: int) -> None:
    """Torch threads for this worker: ``federation.client_num_cpus`` (set once per value)."""
    torch.set_num_threads(max(1, n))


def node(cfg: ExperimentConfig, context: Context, msg: Message | None = None) -> NodeSetup:
    """This client's partition, data path and state dir. When a few simulated SuperNodes
    serve many clients (``federation.supernodes``), the server names the partition in
    the message."""
    node_config = dict(context.node_config)
    if msg is not None and cfg.federation.supernodes > 0:
        config = msg.content.config_records.get("config", {})
        if "partition-id" in config:
            node_config["partition-id"] = int(config["partition-id"])
    return node_setup(node_config, node_id=context.node_id,
                      simulation_base=resolve_state_dir(cfg, run_id=context.run_id))


def train_reply(cfg: ExperimentConfig, msg: Message, context: Context) -> Message:
    use_threads(int(cfg.federation.client_num_cpus))
    config, me = msg.content["config"], node(cfg, context, msg)
    server_round = int(config["server-round"])
    received = from_array_record(msg.content["arrays"])
    try:
        arrays, metrics = fit(cfg, received, partition_id=me.partition_id,
                              server_round=server_round,
                              proximal_mu=float(config.get("proximal-mu", 0.0)),
                              client_dir=me.state_dir, data_path=me.data_path)
    except BudgetExhausted as exc:  # a clear status instead of an update, not an error
        record_participation(me.participation_log, run_id=context.run_id,
                             server_round=server_round, phase="refused", metrics=exc.metrics)
        status = ConfigRecord({STATUS_KEY: BUDGET_EXHAUSTED, "message": str(exc)})
        return Message(RecordDict({"metrics": MetricRecord(exc.metrics), STATUS_RECORD: status}),
                       reply_to=msg)
    record_participation(me.participation_log, run_id=context.run_id, server_round=server_round,
                         phase="train", metrics=metrics)
    arrays, metrics = attack.apply(cfg.attack, context.node_config, arrays, received, metrics,
                                   partition_id=me.partition_id, server_round=server_round,
                                   num_clients=cfg.federation.num_clients)  # simulation only
    residual = (me.state_dir / RESIDUAL_FILE
                if cfg.compression.method != "none" and cfg.compression.error_feedback else None)
    update = update_records(arrays, received, method=cfg.compression.method, residual_path=residual,
                            run_id=context.run_id)
    return Message(RecordDict({**update, "metrics": MetricRecord(metrics)}), reply_to=msg)


def evaluate_reply(cfg: ExperimentConfig, msg: Message, context: Context) -> Message:
    use_threads(int(cfg.federation.client_num_cpus))
    me = node(cfg, context, msg)
    server_round = int(msg.content["config"].get("server-round", 0))
    metrics = evaluate(cfg, from_array_record(msg.content["arrays"]),
                       partition_id=me.partition_id, server_round=server_round,
                       client_dir=me.state_dir, data_path=me.data_path)
    record_participation(me.participation_log, run_id=context.run_id, server_round=server_round,
                         phase="evaluate", metrics=metrics)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
