"""Flower ClientApp: unpack the message, call the plain task function, pack the reply.

Only adapter tensors (the ``shared`` role of ``fedslm.adapters.parameter_role``) and
scalar metrics leave the client; base weights and text never do.
"""

from __future__ import annotations

import functools

import torch  # noqa: F401  (ArrayRecord's torch helpers need torch imported first)
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

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


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    arrays, metrics = fit(
        experiment(context),
        from_array_record(msg.content["arrays"]),
        partition_id=partition_id(context),
        server_round=int(config["server-round"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    content = RecordDict({"arrays": to_array_record(arrays), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    metrics = evaluate(experiment(context), from_array_record(msg.content["arrays"]),
                       partition_id=partition_id(context))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
