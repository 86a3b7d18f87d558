"""Flower ClientApp: unpack the message, call the plain task function, pack the reply.

Only adapter tensors (the ``shared`` role of ``fedslm.adapters.parameter_role``), or
their compressed delta (``fedslm.compression``), and scalar metrics leave the client;
base weights and text never do.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch  # noqa: F401  (ArrayRecord's torch helpers need torch imported first)
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.task import evaluate, fit
from fedslm.adapters import from_array_record
from fedslm.compression import residual_file, update_records
from fedslm.config import ExperimentConfig
from fedslm.runconfig import from_run_config
from fedslm.rundir import output_dir_for

app = ClientApp()


@functools.lru_cache(maxsize=8)
def _config(items: tuple) -> ExperimentConfig:
    cfg = from_run_config(dict(items))
    torch.set_num_threads(max(1, int(cfg.federation.client_num_cpus)))
    return cfg


def experiment(context: Context) -> ExperimentConfig:
    return _config(tuple(sorted(context.run_config.items())))


def partition_id(context: Context, msg: Message | None = None) -> int:
    """The node's partition, or, when a few simulated SuperNodes serve many clients
    (``federation.supernodes``), the one the server names in the message."""
    if msg is not None and experiment(context).federation.supernodes > 0:
        config = msg.content.config_records.get("config", {})
        if "partition-id" in config:
            return int(config["partition-id"])
    return int(context.node_config["partition-id"])


def residual_path(cfg: ExperimentConfig, context: Context, msg: Message) -> Path | None:
    """This partition's compression residual file, or None without error feedback."""
    if cfg.compression.method == "none" or not cfg.compression.error_feedback:
        return None
    return residual_file(output_dir_for(cfg.output_dir, context.run_id), partition_id(context, msg))


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, config = experiment(context), msg.content["config"]
    received = from_array_record(msg.content["arrays"])
    arrays, metrics = fit(
        cfg,
        received,
        partition_id=partition_id(context, msg),
        server_round=int(config["server-round"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    update = update_records(arrays, received, method=cfg.compression.method,
                            residual_path=residual_path(cfg, context, msg))
    return Message(RecordDict({**update, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    metrics = evaluate(experiment(context), from_array_record(msg.content["arrays"]),
                       partition_id=partition_id(context, msg))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
