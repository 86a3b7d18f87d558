"""FedAvg on LoRA factors (today's behaviour): A and B averaged separately.

With heterogeneous ranks each reply is zero-padded to the global rank first (HetLoRA).
The mean of the factors is not the mean of the products: ``mean(B) @ mean(A)`` differs
from ``mean(B @ A)`` by the cross terms ``sum_ij w_i w_j B_i A_j, i != j``; the tests
show that gap on hand-built factors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedslm.aggregation.lora_factors import Arrays, pad, weighted_mean, weights_of


def aggregate(replies: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int], *,
              rank: int) -> Arrays:
    """Weighted mean of every tensor, after padding each reply's LoRA layers to ``rank``."""
    w = weights_of(num_examples)
    padded = [pad(r, rank) for r in replies]
    return {name: weighted_mean([p[name] for p in padded], w) for name in padded[0]}
