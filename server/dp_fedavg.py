"""User-level DP (DP-FedAvg) by wrapping Flower's fixed-clipping DP strategy wrapper.

Each client's whole update is clipped to L2 norm C (on the client by Flower's
``adaptiveclipping_mod`` when ``clip_side=client``; on the server always, which is a
no-op for an honest clipping client), the equal-weight mean is taken and Flower's
``DifferentialPrivacyClientSideFixedClipping`` adds Gaussian noise of stddev z*C/m.
This wrapper supplies what Flower leaves to the caller, each needed for the noise to
mean what the ledger says:

- equal weights: the inner FedAvg is weighted by a unit weight the server stamps on
  every reply (a client's example count would scale its influence beyond C/m);
- noise calibrated to the m updates actually averaged (Flower uses the number sampled);
- noise from fresh OS entropy: the run seeds numpy's global RNG from the public config,
  and Flower draws DP noise from it;
- adaptive clipping after Andrew et al. 2021 with the clip of *this* round used for both
  clipping and noise. Flower's adaptive wrappers are not used: they move the clip
  norm before adding noise (noise then matches the next round's norm, not the one the
  updates were clipped to) and step it in the wrong direction (norm_bit there means
  "clipped", yet the rule they apply expects "not clipped");
- the release ledger and a budget check (``fedslm.server.privacy``), saved at every release.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, Strategy
from flwr.supercore.differential_privacy import KEY_NORM_BIT, compute_adaptive_noise_params, get_norm

from fedslm.config import PrivacyConfig
from fedslm.server.lora_aggregation import LoraAggregation
from fedslm.server.privacy import Release, ServerPrivacyState, save_server_privacy

UNIT_WEIGHT_KEY = "dp-unit-weight"


def _fresh_entropy() -> int:
    return int.from_bytes(os.urandom(8), "little")


class UserLevelDp(Strategy):
    """DP-FedAvg around a FedAvg-family strategy; ``state`` is the server's privacy ledger."""

    def __init__(self, strategy: FedAvg | LoraAggregation, state: ServerPrivacyState, *,
                 privacy: PrivacyConfig, expected_sampled: int, state_path: Path | None = None) -> None:
        super().__init__()
        # per-client ranks or a product-space rule: the LoRA wrapper clips and noises in the
        # space its rule averages (fedslm.aggregation.private); its inner strategy is FedAvg's
        self.lora = strategy if isinstance(strategy, LoraAggregation) else None
        base = strategy.strategy if isinstance(strategy, LoraAggregation) else strategy
        if not isinstance(base, FedAvg) or base.__class__.aggregate_train is not FedAvg.aggregate_train:
            raise ValueError(f"dp_fedavg needs a strategy that aggregates like FedAvg, got {type(base).__name__}")
        self.fedavg = base
        self.strategy: Strategy = strategy
        self.state = state
        self.state_path = state_path
        self.max_epsilon = privacy.max_epsilon
        self.target_quantile = privacy.target_quantile
        self.clip_norm_lr = privacy.clip_norm_lr
        self.count_stddev, self.update_noise_multiplier = 0.0, state.noise_multiplier
        if state.clipping == "adaptive":
            self.count_stddev, self.update_noise_multiplier = compute_adaptive_noise_params(
                state.noise_multiplier, expected_sampled, privacy.clipped_count_stddev or None)
        self._rng = np.random.default_rng(_fresh_entropy())
        self._pending: dict[int, tuple[int, int]] = {}  # round -> (sampled, population)
        self._dp: Strategy | None = None
        self._current: ArrayRecord | None = None
        self.last_round: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"UserLevelDp({self.state.clipping} clipping, {self.state.clip_side}-side, {self.strategy!r})"

    def summary(self) -> None:
        log(INFO, "\t├──> user-level DP: noise multiplier %s, %s clipping (%s-side) at %.4g",
            self.state.noise_multiplier, self.state.clipping, self.state.clip_side,
            self.state.clipping_norm)
        self.strategy.summary()

    def _flower_wrapper(self) -> Strategy:
        # Flower's client-side wrapper aggregates and adds the noise; clipping happened
        # before it (on the client by the mod, and here in ``_clip_update`` either way).
        return DifferentialPrivacyClientSideFixedClipping(
            self.strategy, self.update_noise_multiplier, self.state.clipping_norm, 1)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.last_round = {}
        population = len(list(grid.get_node_ids()))
        if self.max_epsilon > 0:
            m = min(population, max(int(population * self.fedavg.fraction_train), self.fedavg.min_train_nodes))
            projected = self.state.epsilon(Release(server_round, self.state.noise_multiplier, m, population))
            if projected > self.max_epsilon:
                log(WARNING, "round %d not started: user-level epsilon would reach %.4g > "
                    "privacy.max_epsilon=%g", server_round, projected, self.max_epsilon)
                return []
        self._current = arrays
        self._dp = self._flower_wrapper()
        messages = list(self._dp.configure_train(server_round, arrays, config, grid))
        self._pending[server_round] = (len(messages), max(population, len(messages)))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sampled, population = self._pending.pop(server_round, (len(replies), len(replies)))
        if not replies or self._dp is None or self._current is None:
            return None, None
        clip = self.state.clipping_norm
        if self.lora is not None:
            arrays, metrics, clipped = self._lora_release(server_round, replies, clip)
            return self._released(server_round, arrays, metrics, clipped, sampled, population, clip, replies)
        clipped = []
        for reply in replies:
            was_clipped = self._clip_update(reply, clip)  # a no-op for a client that clipped
            bit = _metrics(reply).get(KEY_NORM_BIT) if self.state.clip_side == "client" else None
            clipped.append(bool(bit) if bit is not None else was_clipped)
        for reply in replies:
            _metrics(reply)[UNIT_WEIGHT_KEY] = 1
        self._dp.num_sampled_clients = len(replies)  # noise z*C/m for the m updates averaged
        saved, weight_key = np.random.get_state(), self.fedavg.weighted_by_key
        np.random.seed(_fresh_entropy() % 2**32)
        self.fedavg.weighted_by_key = UNIT_WEIGHT_KEY  # training only; evaluation keeps its weights
        try:
            arrays, metrics = self._dp.aggregate_train(server_round, replies)
        finally:
            np.random.set_state(saved)
            self.fedavg.weighted_by_key = weight_key
            for reply in replies:
                _metrics(reply).pop(UNIT_WEIGHT_KEY, None)
        return self._released(server_round, arrays, metrics, clipped, sampled, population, clip, replies)

    def _lora_release(self, server_round: int, replies: list[Message], clip: float
                      ) -> tuple[ArrayRecord | None, MetricRecord | None, list[bool]]:
        """The LoRA wrapper's release: clipped and noised in its rule's space, equal weights."""
        assert self.lora is not None
        for reply in replies:
            _metrics(reply)[UNIT_WEIGHT_KEY] = 1
        try:
            arrays, metrics, server_clipped = self.lora.aggregate_train_private(
                server_round, replies, clip_norm=clip, noise_multiplier=self.update_noise_multiplier,
                rng=self._rng, weight_key=UNIT_WEIGHT_KEY)
        finally:
            for reply in replies:
                _metrics(reply).pop(UNIT_WEIGHT_KEY, None)
        clipped = []
        for reply, was_clipped in zip(replies, server_clipped):
            bit = _metrics(reply).get(KEY_NORM_BIT) if self.state.clip_side == "client" else None
            clipped.append(bool(bit) if bit is not None and not self.lora.rule.product_space else was_clipped)
        return arrays, metrics, clipped

    def _released(self, server_round: int, arrays: ArrayRecord | None, metrics: MetricRecord | None,
                  clipped: list[bool], sampled: int, population: int, clip: float, replies: list[Message]
                  ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record a release in the ledger (and move an adaptive clip) after aggregation."""
        if arrays is None:
            return None, None
        self.state.releases.append(Release(server_round, self.state.noise_multiplier, sampled, population))
        fraction = sum(clipped) / len(clipped)
        if self.state.clipping == "adaptive":
            unclipped = len(clipped) - sum(clipped)
            noisy = (unclipped + self._rng.normal(0.0, self.count_stddev)) / len(clipped)
            self.state.clipping_norm = clip * math.exp(-self.clip_norm_lr * (noisy - self.target_quantile))
            fraction = 1.0 - noisy  # the released (noised) value, covered by epsilon
        self.state.rounds_done = server_round
        if self.state_path is not None:
            save_server_privacy(self.state, self.state_path)
        self.last_round = {
            "dp_epsilon_user": self.state.epsilon(), "dp_delta": self.state.delta,
            "dp_noise_multiplier": self.state.noise_multiplier,
            "dp_update_noise_multiplier": self.update_noise_multiplier,
            "dp_clip_norm": clip, "dp_clip_norm_next": self.state.clipping_norm,
            "dp_clipped_fraction": min(1.0, max(0.0, fraction)), "dp_updates_averaged": float(len(replies)),
        }
        log(INFO, "[round %d] user-level DP: epsilon %.4g at delta %g after %d releases",
            server_round, self.last_round["dp_epsilon_user"], self.state.delta, len(self.state.releases))
        return arrays, metrics

    def _clip_update(self, reply: Message, clip: float) -> bool:
        """Flower's FlatClip of ``reply - current`` to ``clip`` in place; True if it clipped.

        Done here rather than by Flower's server-side wrapper, which divides by the
        update norm and fails on an unchanged (zero) update; and done for client-side
        clipping too, so a client that skipped the mod cannot exceed the sensitivity.
        """
        key, record = next(iter(reply.content.array_records.items()))
        current = self._current.to_numpy_ndarrays()
        update = [a - b for a, b in zip(record.to_numpy_ndarrays(), current, strict=True)]
        norm = get_norm(update)
        if norm <= clip:
            return False
        scale = clip / norm
        reply.content.array_records[key] = ArrayRecord(
            {k: Array(np.asarray(c + u * scale, dtype=c.dtype))
             for k, c, u in zip(record.keys(), current, update, strict=True)})
        return True

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    @property
    def aggregation_metrics(self) -> dict[str, float]:
        """The LoRA wrapper's per-round figures (ranks, truncation), for rounds.csv."""
        return self.lora.aggregation_metrics if self.lora is not None else {}


def _metrics(reply: Message) -> MetricRecord:
    return next(iter(reply.content.metric_records.values()))
