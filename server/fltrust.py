"""FLTrust (Cao et al., NDSS 2021): trust each update by its direction against the server's own.

Each round the server trains the global adapter it sent on a small clean root set (the
client's plain loop, ``fedslm.training.train_local``: same steps, learning rate and
optimizer, no DP) and takes that as the reference update δ₀. A client's delta δᵢ (from
the same global) gets trust TSᵢ = ReLU(cos(δᵢ, δ₀)), is rescaled to ‖δ₀‖, and the new
global is ``global + Σ TSᵢ (‖δ₀‖/‖δᵢ‖) δᵢ / Σ TSᵢ``; with Σ TSᵢ = 0 the global stays. Example
counts play no part: a client's say is its direction, its size is the server's.

Flower 1.41 has no FLTrust: ``FLTrust`` is Flower's ``FedAvg`` with its aggregation
replaced (and the global it sends remembered, to take deltas from); the round loop screens,
decodes and bounds replies before it as for any rule. Per round it leaves
``aggregation_metrics`` (rounds.csv, MLflow) and per client ``client_columns`` (clients.csv:
``trust``) for ``fedslm.server.rounds.train_phase``.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedslm.config import ExperimentConfig

Arrays = dict[str, np.ndarray]
ServerUpdate = Callable[[int, Arrays], Arrays]  # (round, global) -> the server's delta δ₀
TRUST_KEY = "trust"


@dataclass
class TrustAggregate:
    delta: Arrays | None  # Σ TSᵢ (‖δ₀‖/‖δᵢ‖) δᵢ / Σ TSᵢ; None when no update is trusted
    trust: list[float]  # TSᵢ, in the order of the deltas


def _flat(arrays: Mapping[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in keys])


def fltrust_aggregate(deltas: list[Mapping[str, np.ndarray]], server_delta: Mapping[str, np.ndarray]) -> TrustAggregate:
    """FLTrust's aggregate of client ``deltas`` against ``server_delta`` (δ₀), over all
    tensors at once (a classification head is part of the delta). A zero delta, or a
    zero δ₀, earns no trust."""
    keys = sorted(server_delta)
    ref = _flat(server_delta, keys)
    ref_norm = float(np.linalg.norm(ref))
    total, trust = np.zeros_like(ref), []
    for delta in deltas:
        flat = _flat(delta, keys)
        norm = float(np.linalg.norm(flat))
        score = max(0.0, float(flat @ ref) / (norm * ref_norm)) if norm > 0 and ref_norm > 0 else 0.0
        trust.append(score)
        if score > 0:
            total += score * (ref_norm / norm) * flat
    if sum(trust) == 0:
        return TrustAggregate(None, trust)
    total /= sum(trust)
    out, start = {}, 0
    for k in keys:
        shape = np.shape(server_delta[k])
        size = math.prod(shape)
        out[k] = total[start : start + size].reshape(shape)
        start += size
    return TrustAggregate(out, trust)


class FLTrust(FedAvg):
    """Flower's FedAvg with FLTrust's aggregation (see the module docstring).
    ``server_update(round, global)`` returns δ₀ (``root_update``)."""

    def __init__(self, *, server_update: ServerUpdate, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server_update = server_update
        self.global_arrays: Arrays = {}  # what this round's configure_train sent
        self.aggregation_metrics: dict[str, float] = {}  # the last round's, for rounds.csv
        self.client_columns: dict[int, dict[str, float]] = {}  # node id -> clients.csv columns

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_arrays = {k: v.numpy() for k, v in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        self.aggregation_metrics, self.client_columns = {}, {}
        if not valid:
            return None, None
        base = self.global_arrays
        deltas = [
            {
                k: m.content.array_records[self.arrayrecord_key][k].numpy().astype(np.float64) - v
                for k, v in base.items()
            }
            for m in valid
        ]
        server_delta = self.server_update(server_round, base)
        result = fltrust_aggregate(deltas, server_delta)
        self.aggregation_metrics = {
            "robust_trust_zero_fraction": sum(t == 0 for t in result.trust) / len(valid),
            "robust_trust_median": statistics.median(result.trust),
            "robust_root_update_norm": float(
                np.sqrt(sum(np.square(d, dtype=np.float64).sum() for d in server_delta.values()))
            ),
        }
        self.client_columns = {m.metadata.src_node_id: {TRUST_KEY: t} for m, t in zip(valid, result.trust)}
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        if result.delta is None:
            log(
                WARNING,
                "[round %d] fltrust: no update points within 90 degrees of the server's "
                "root update (all %d trust 0); the global adapter is unchanged",
                server_round,
                len(valid),
            )
            return ArrayRecord({k: Array(v) for k, v in base.items()}), metrics
        return ArrayRecord({k: Array(np.asarray(v + result.delta[k], dtype=v.dtype)) for k, v in base.items()}), metrics


def root_seed(seed: int, server_round: int) -> int:
    """The server's data order for ``server_round``: its own stream, no client's."""
    digest = hashlib.sha256(f"fedslm-fltrust-root:{seed}:{server_round}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1)


def root_update(cfg: ExperimentConfig) -> ServerUpdate:
    """δ₀ for a round: the global adapter trained on the root records (``fedslm.data.root_texts``)
    with the clients' plain loop, minus the global. Model and records load on first use."""
    loaded: dict[str, Any] = {}

    def update(server_round: int, global_arrays: Arrays) -> Arrays:
        from fedslm.adapters import adapter_arrays, load_adapter_arrays, reset_to_init
        from fedslm.data import root_texts
        from fedslm.runtime import encoded, experiment_model
        from fedslm.tasks import get_task
        from fedslm.training import train_local

        if not loaded:
            model, tokenizer = experiment_model(cfg)
            records = root_texts(
                cfg.data,
                num_clients=cfg.federation.num_clients,
                task=cfg.task.name,
                root_docs=cfg.strategy.root_docs,
                root_data=cfg.strategy.root_data,
            )
            loaded.update(model=model, tensors=encoded(cfg, records, tokenizer))
        model = loaded["model"]
        load_adapter_arrays(model, global_arrays)
        reset_to_init(model, "personal", seed=cfg.training.seed)  # as a client with no state
        train_local(
            model,
            loaded["tensors"],
            cfg.training,
            loss_fn=get_task(cfg.task.name).loss,
            generator_seed=root_seed(cfg.training.seed, server_round),
        )
        trained = adapter_arrays(model)
        return {k: trained[k].astype(np.float64) - np.asarray(v, dtype=np.float64) for k, v in global_arrays.items()}

    return update
