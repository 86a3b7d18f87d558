"""Flower ClientApp: unpack the message, call the plain task function, pack the reply.

Only adapter tensors (the ``shared`` role of ``fedslm.adapters.parameter_role``) and
scalar metrics leave the client; base weights, text and personal tensors never do.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch  # noqa: F401  (ArrayRecord's torch helpers need torch imported first)
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.personal_state import resolve_state_dir
from client.task import evaluate, fit
from fedslm.adapters import from_array_record, to_array_record
from fedslm.config import ExperimentConfig
from fedslm.runconfig import from_run_config

app = ClientApp()


@functools.lru_cache(maxsize=8)
def _config(items: tuple) -> ExperimentConfig:
    cfg = from_run_config(dict(items))
    torch.set_num_threads(max(1, int(cfg.federation.client_num_cpus)))
    return cfg


def experiment(context: Context) -> ExperimentConfig:
    return _config(tuple(sorted(context.run_config.items())))


def partition_id(context: Context) -> int:
    return int(context.node_config["partition-id"])


def state_dir(context: Context) -> Path:
    """Where this client keeps personal adapters: node config ``state-dir`` (a device
    agent's own dir) if set, else from the experiment config."""
    return resolve_state_dir(experiment(context), run_id=context.run_id,
                             override=str(context.node_config.get("state-dir", "")))


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    arrays, metrics = fit(
        experiment(context),
        from_array_record(msg.content["arrays"]),
        partition_id=partition_id(context),
        server_round=int(config["server-round"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        state_dir=state_dir(context),
    )
    content = RecordDict({"arrays": to_array_record(arrays), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    metrics = evaluate(experiment(context), from_array_record(msg.content["arrays"]),
                       partition_id=partition_id(context),
                       server_round=int(msg.content["config"].get("server-round", 0)),
                       state_dir=state_dir(context))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
