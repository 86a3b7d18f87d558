"""FlexLoRA (Bai et al., NeurIPS 2024): average the full products, redistribute by SVD.

The server forms ``M = sum_i w_i B_i A_i`` (dense, ``out x in`` per layer), takes its SVD
and keeps singular-value-ordered balanced factors at the global rank. A client of rank
``r`` receives the first ``r`` components (``lora_factors.truncate``), which is exactly
the best rank-``r`` approximation of ``M`` (Eckart-Young). Same global as ``flora`` up
to float rounding; it costs a dense product and an ``out x in`` SVD per layer instead of
the stacks' thin QR.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedslm.aggregation.lora_factors import (Arrays, aggregate_pairs, nonzero_components, product,
                                             revive_empty_components)


def product_mean(factors: Sequence[tuple[np.ndarray, np.ndarray]], weights: np.ndarray) -> np.ndarray:
    """``sum_i w_i B_i @ A_i`` (float64)."""
    return sum(w * product(b, a) for w, (b, a) in zip(weights, factors))


def svd_factors(m: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Balanced rank-``rank`` factors of ``m`` and the relative residual of the truncation."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    k = min(rank, len(s))
    root = np.sqrt(s[:k])
    b = np.zeros((m.shape[0], rank))
    a = np.zeros((rank, m.shape[1]))
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vt[:k]
    b, a = revive_empty_components(b, a, nonzero_components(s, k))
    total = float(np.sum(s ** 2))
    return b, a, float(np.sqrt(np.sum(s[k:] ** 2) / total)) if total > 0 else 0.0


def aggregate(replies: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int], *,
              rank: int) -> tuple[Arrays, float]:
    """The global adapter at ``rank`` and the largest per-layer truncation residual."""
    return aggregate_pairs(replies, num_examples,
                           lambda factors, w: svd_factors(product_mean(factors, w), rank))
