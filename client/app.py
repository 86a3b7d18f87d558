"""Flower ClientApp: unpack the message, call the plain task function, pack the reply.

Only adapter tensors (the ``shared`` role of ``fedslm.adapters.parameter_role``) and
scalar metrics leave the client; base weights and text never do. A DP-SGD client whose
budget is spent replies with a status record and its epsilon instead of an update.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch  # noqa: F401  (ArrayRecord's torch helpers need torch imported first)
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod

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


def state_dir(cfg: ExperimentConfig, context: Context) -> Path:
    """Where this client keeps state across rounds (its privacy ledger).

    ``node_config["state-dir"]`` when the deployment gives one (a device's own disk);
    otherwise ``<output dir>/clients/<partition id>`` (simulation: one dir per virtual client).
    """
    configured = context.node_config.get("state-dir")
    if configured:
        return Path(str(configured))
    base = Path(cfg.output_dir) if cfg.output_dir else (
        Path.home() / ".cache" / "fedslm" / "runs" / str(context.run_id))
    return base / "clients" / str(partition_id(context))


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
            state_dir=state_dir(cfg, context),
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
                       partition_id=partition_id(context))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
