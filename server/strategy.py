"""Flower strategies selected by name, and the screening of client updates before them.

We wrap Flower's strategies rather than copy them: the round loop calls their
``configure_*``/``aggregate_*`` methods; this module only maps config to constructors
and keeps malformed or hostile updates away from the aggregation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Strategy,
)

from fedslm.config import ExperimentConfig
from fedslm.keys import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY
from fedslm.wire import WireError, decode_array



def build_strategy(cfg: ExperimentConfig) -> Strategy:
    """The Flower strategy named by ``strategy.name`` with its configured knobs."""
    s, fed = cfg.strategy, cfg.federation
    common = dict(
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=min(s.min_train_clients, fed.num_clients),
        min_evaluate_nodes=min(s.min_evaluate_clients, fed.num_clients),
        min_available_nodes=min(max(s.min_train_clients, s.min_evaluate_clients), fed.num_clients),
        weighted_by_key=WEIGHT_KEY,
        arrayrecord_key=ARRAYS_KEY,
    )
    fedopt = dict(eta=s.eta, eta_l=cfg.training.learning_rate, tau=s.tau)
    if s.name == "fedavg":
        return FedAvg(**common)
    if s.name == "fedavgm":
        return FedAvgM(**common, server_learning_rate=s.server_learning_rate,
                       server_momentum=s.server_momentum)
    if s.name == "fedprox":
        return FedProx(**common, proximal_mu=s.proximal_mu)
    if s.name == "fedadam":
        return FedAdam(**common, **fedopt, beta_1=s.beta_1, beta_2=s.beta_2)
    if s.name == "fedyogi":
        return FedYogi(**common, **fedopt, beta_1=s.beta_1, beta_2=s.beta_2)
    if s.name == "fedadagrad":
        return FedAdagrad(**common, **fedopt)
    raise ValueError(f"strategy.name: unknown strategy {s.name!r}")  # config already checked


@dataclass
class Screened:
    accepted: list[Message]
    rejected: dict[int, str]  # node id -> why


def screen_train_replies(replies: list[Message], reference: ArrayRecord) -> Screened:
    """Keep only replies whose update could have come from an honest client.

    An update must carry exactly the adapter tensors the server sent, with the same
    shapes, all finite, and a positive integer example count; anything else is dropped
    and reported instead of crashing the aggregation or poisoning the global adapter.
    """
    expected = {name: tuple(arr.shape) for name, arr in reference.items()}
    accepted, rejected = [], {}
    for msg in replies:
        why = _problem(msg, expected)
        if why is None:
            accepted.append(msg)
        else:
            rejected[msg.metadata.src_node_id] = why
    return Screened(accepted, rejected)


def _problem(msg: Message, expected: dict[str, tuple[int, ...]]) -> str | None:
    content = msg.content
    if ARRAYS_KEY not in content.array_records or METRICS_KEY not in content.metric_records:
        return "reply lacks adapter arrays or metrics"
    weight = content.metric_records[METRICS_KEY].get(WEIGHT_KEY)
    if not isinstance(weight, int) or isinstance(weight, bool) or weight <= 0:
        return f"bad {WEIGHT_KEY}: {weight!r}"
    arrays = content.array_records[ARRAYS_KEY]
    names = set(arrays.keys())
    if names != set(expected):
        extra, missing = sorted(names - set(expected)), sorted(set(expected) - names)
        return f"unexpected tensors {extra[:3]} / missing {missing[:3]}"
    for name, arr in arrays.items():
        if tuple(arr.shape) != expected[name]:
            return f"tensor {name} has shape {tuple(arr.shape)}, expected {expected[name]}"
        try:
            values = decode_array(arr, shape=expected[name])
        except WireError as err:
            return f"tensor {name}: {err}"
        if values.dtype.kind != "f":
            return f"tensor {name} has dtype {values.dtype}, expected floating point"
        if not np.isfinite(values).all():
            return f"tensor {name} has non-finite values"
    for key, value in content.metric_records[METRICS_KEY].items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"metric {key} is not finite"
    return None
