"""LoRA-aware aggregation around Flower's strategy: per-client ranks and product-space rules.

``with_aggregation`` wraps the strategy ``build_strategy`` made, only when needed
(``aggregation.name`` flora/flexlora, or ``peft.ranks`` set); fedavg and ffa at one rank
are Flower's strategy unchanged (FFA's difference is the role rule: A never trains or
travels, so the global and every message hold only B). The wrapper

- sends each sampled client its own rank's slice of the global (its first r LoRA
  components: for the SVD-ordered globals of flora/flexlora, the best rank-r
  approximation), so the round loop screens each reply against exactly that;
- zero-pads replies back to the global rank and lets Flower's strategy average them
  (fedavg with mixed ranks, HetLoRA), or aggregates in product space itself (flora,
  flexlora) and uses the wrapped strategy's metric aggregation.

The wrapped strategy is ``.strategy`` (as in Flower's DP wrappers), so checkpoints find
its state.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedslm.adapters import from_array_record, to_array_record
from fedslm.aggregation import AggregationRule, aggregation_rule
from fedslm.aggregation.lora_factors import Arrays, pad, rank_of, truncate
from fedslm.aggregation.private import private_aggregate
from fedslm.aggregation.ranks import TIER_INDEX_KEY, RankSpec, assign_ranks, parse_ranks
from fedslm.config import ExperimentConfig
from fedslm.server.checkpoint import StateHook
from fedslm.server.strategy import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY

PARTITION_KEY = "partition-id"


def with_aggregation(cfg: ExperimentConfig, strategy: Strategy) -> Strategy:
    """``strategy`` wrapped for ``cfg.aggregation`` / ``cfg.peft.ranks``, or as it is."""
    rule, spec = aggregation_rule(cfg.aggregation.name), parse_ranks(cfg.peft.ranks)
    if not rule.product_space and not spec.ranks:
        return strategy
    return LoraAggregation(strategy, rule, global_rank=cfg.peft.r, spec=spec)


class LoraAggregation(Strategy):
    """See the module docstring."""

    def __init__(self, strategy: Strategy, rule: AggregationRule, *, global_rank: int,
                 spec: RankSpec) -> None:
        self.strategy = strategy
        self.rule = rule
        self.global_rank = global_rank
        self.spec = spec
        self.node_rank: dict[int, int] = {}  # a device's rank, once decided, stays
        self.partitions: dict[int, int] = {}  # node id -> partition id, from its replies
        self.tiers: dict[int, int] = {}  # node id -> reported tier index (peft.ranks by tier)
        self.aggregation_metrics: dict[str, float] = {}  # the last round's, for rounds.csv
        self.sent: dict[int, Arrays] = {}  # this round: what each node was sent (DP-FedAvg's base)

    # -- who gets which rank -----------------------------------------------------------
    def rank_of(self, node_id: int, grid: Grid | None = None) -> int:
        if node_id not in self.node_rank:
            nodes = sorted(set(grid.get_node_ids()) | {node_id} if grid is not None else {node_id})
            decided = assign_ranks(self.spec, nodes, default_rank=self.global_rank,
                                   partitions=self.partitions, tiers=self.tiers)
            rank = decided[node_id]
            known = ((not self.spec.by_partition or node_id in self.partitions)
                     and (not self.spec.by_tier or node_id in self.tiers))
            if known:  # decided for good (a partition or tier not heard of yet is not)
                self.node_rank[node_id] = rank
            return rank
        return self.node_rank[node_id]

    def _learn_partitions(self, replies: Iterable[Message]) -> None:
        for msg in replies:
            metrics = msg.content.metric_records.get(METRICS_KEY, {})
            if PARTITION_KEY in metrics:
                self.partitions[msg.metadata.src_node_id] = int(metrics[PARTITION_KEY])
            if TIER_INDEX_KEY in metrics:
                self.tiers[msg.metadata.src_node_id] = int(metrics[TIER_INDEX_KEY])

    # -- Flower's Strategy interface ---------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        full = from_array_record(arrays)
        sliced: dict[int, tuple[Arrays, ArrayRecord]] = {}
        self.sent = {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            rank = self.rank_of(node, grid)
            self.sent[node] = full
            if rank != self.global_rank:
                if rank not in sliced:
                    part = truncate(full, rank)
                    sliced[rank] = part, to_array_record(part)
                content = RecordDict(dict(msg.content.items()))
                self.sent[node], content[ARRAYS_KEY] = sliced[rank]
                msg.content = content
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._learn_partitions(replies)
        if not replies:
            return self.strategy.aggregate_train(server_round, replies)
        updates = [from_array_record(m.content[ARRAYS_KEY]) for m in replies]
        ranks = [rank_of(u) for u in updates]
        self.aggregation_metrics = {"agg_rank_min": float(min(ranks)), "agg_rank_max": float(max(ranks))}
        if self.rule.product_aggregate is None:  # fedavg with mixed ranks: pad, Flower averages
            for msg, update in zip(replies, updates):
                content = RecordDict(dict(msg.content.items()))
                content[ARRAYS_KEY] = to_array_record(pad(update, self.global_rank))
                msg.content = content
            return self.strategy.aggregate_train(server_round, replies)
        counts = [int(m.content[METRICS_KEY][WEIGHT_KEY]) for m in replies]
        arrays, residual = self.rule.product_aggregate(updates, counts, rank=self.global_rank)
        self.aggregation_metrics["agg_truncation_error"] = residual
        if residual > 1e-6:
            log(INFO, "[round %d] %s: global rank %d keeps all but %.2g of the mean product "
                "(relative Frobenius)", server_round, self.rule.name, self.global_rank, residual)
        aggregate_metrics = getattr(self.strategy, "train_metrics_aggr_fn", None)
        metrics = (aggregate_metrics([m.content for m in replies], WEIGHT_KEY)
                   if aggregate_metrics is not None else None)
        return to_array_record(arrays), metrics

    def aggregate_train_private(self, server_round: int, replies: list[Message], *, clip_norm: float,
                                noise_multiplier: float, rng: np.random.Generator, weight_key: str
                                ) -> tuple[ArrayRecord | None, MetricRecord | None, list[bool]]:
        """DP-FedAvg's release for this rule (``fedslm.aggregation.private``): each reply's
        delta against what its node was sent, in the space the rule averages, clipped to
        ``clip_norm``; equal-weight mean plus N(0, (z C / m)^2). Returns the new global,
        the train metrics (weighted by ``weight_key``) and which replies were clipped."""
        self._learn_partitions(replies)
        if not replies:
            return None, None, []
        updates = [from_array_record(m.content[ARRAYS_KEY]) for m in replies]
        sent = [self.sent[m.metadata.src_node_id] for m in replies]
        ranks = [rank_of(u) for u in updates]
        arrays, residual, norms = private_aggregate(
            updates, sent, product_space=self.rule.product_space, rank=self.global_rank,
            clip_norm=clip_norm, noise_multiplier=noise_multiplier, rng=rng)
        self.aggregation_metrics = {"agg_rank_min": float(min(ranks)), "agg_rank_max": float(max(ranks))}
        if self.rule.product_space:
            self.aggregation_metrics["agg_truncation_error"] = residual
        aggregate_metrics = getattr(self.strategy, "train_metrics_aggr_fn", None)
        metrics = (aggregate_metrics([m.content for m in replies], weight_key)
                   if aggregate_metrics is not None else None)
        return to_array_record(arrays), metrics, [n > clip_norm for n in norms]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._learn_partitions(replies)
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log(INFO, "\t└──> LoRA aggregation: %s, global rank %d, client ranks %s", self.rule.name,
            self.global_rank, sorted(set(self.node_rank.values())) or [self.global_rank])
        self.strategy.summary()


def rank_state_hook(strategy: Strategy) -> StateHook | None:
    """Each node's rank, partition id and tier in every checkpoint, so a resumed run
    sends every device the rank it had (a rank decided by share over the nodes seen, or
    by a partition or tier learned from replies, is not recomputed from scratch)."""
    lora = strategy
    while not isinstance(lora, LoraAggregation):
        if (lora := getattr(lora, "strategy", None)) is None:
            return None

    def save() -> dict:
        return {name: {str(k): v for k, v in getattr(lora, name).items()}
                for name in ("node_rank", "partitions", "tiers")}

    def load(data: dict) -> None:
        for name in ("node_rank", "partitions", "tiers"):
            setattr(lora, name, {int(k): int(v) for k, v in data[name].items()})

    return StateHook("lora_ranks", save, load)
