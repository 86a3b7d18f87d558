"""Flower ClientApp: unpack the message, call the plain task function, pack the reply.

Only adapter tensors (the ``shared`` role of ``fedslm.adapters.parameter_role``) and
scalar metrics leave the client; base weights, text and personal tensors never do. A
DP-SGD client whose budget is spent replies with a status record and its epsilon
instead of an update.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch  # noqa: F401  (ArrayRecord's torch helpers need torch imported first)
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod

from client.personal_state import resolve_state_dir
from client.privacy import BUDGET_EXHAUSTED, STATUS_KEY, STATUS_RECORD, BudgetExhausted
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
    """Base dir of client state (personal adapters, privacy ledgers): the node config's
    ``state-dir`` (a device agent's own disk) if set, else from the experiment config;
    each client keeps its files under ``<base>/<partition id>/``."""
    return resolve_state_dir(experiment(context), run_id=context.run_id,
                             override=str(context.node_config.get("state-dir", "")))


def user_level_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """dp_fedavg with ``privacy.clip_side=client``: Flower's ``adaptiveclipping_mod``
    clips the update before it leaves (to the norm the server sent) and reports whether
    it clipped; the server adapts the norm or keeps it fixed. Otherwise a no-op."""
    privacy = experiment(context).privacy
    if privacy.mode == "dp_fedavg" and privacy.clip_side == "client":
        return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[user_level_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg = experiment(context)
    try:
        arrays, metrics = fit(
            cfg,
            from_array_record(msg.content["arrays"]),
            partition_id=partition_id(context),
            server_round=int(config["server-round"]),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            state_dir=state_dir(context),
        )
    except BudgetExhausted as exc:  # a clear status instead of an update, not an error
        status = ConfigRecord({STATUS_KEY: BUDGET_EXHAUSTED, "message": str(exc)})
        return Message(RecordDict({"metrics": MetricRecord(exc.metrics), STATUS_RECORD: status}),
                       reply_to=msg)
    content = RecordDict({"arrays": to_array_record(arrays), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    metrics = evaluate(experiment(context), from_array_record(msg.content["arrays"]),
                       partition_id=partition_id(context),
                       server_round=int(msg.content["config"].get("server-round", 0)),
                       state_dir=state_dir(context))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
