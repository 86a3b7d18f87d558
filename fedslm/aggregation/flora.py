"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' factors.

``B_s = [w_1 B_1 | ... | w_n B_n]`` and ``A_s = [A_1; ...; A_n]`` give
``B_s @ A_s = sum_i w_i B_i A_i`` exactly, whatever the clients' ranks. The stack has
rank ``sum_i r_i``; the global adapter has the model's rank, so the stacked product is
re-factored by a thin SVD (QR of both stacks, SVD of the small core) into
singular-value-ordered factors of the global rank: exact when the product's rank fits,
otherwise its best approximation at that rank (the residual is reported per round).
Memory stays O((out + in) * sum r_i): the full ``out x in`` product is never formed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedslm.aggregation.lora_factors import (Arrays, aggregate_pairs, nonzero_components, revive_empty_components)


def stack(factors: Sequence[tuple[np.ndarray, np.ndarray]],
          weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(B_s, A_s)`` with ``B_s @ A_s == sum_i weights_i B_i @ A_i`` (float64)."""
    b = np.concatenate([w * np.asarray(b_i, np.float64) for w, (b_i, _) in zip(weights, factors)], axis=1)
    a = np.concatenate([np.asarray(a_i, np.float64) for _, a_i in factors], axis=0)
    return b, a


def refactor(b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Balanced factors ``(U_r sqrt(S_r), sqrt(S_r) V_r^T)`` of the best rank-``rank``
    approximation of ``b @ a`` (components it lacks: B zero, A fresh, see
    ``revive_empty_components``); and the relative Frobenius
    residual of that approximation (0 when the product's rank fits)."""
    qb, rb = np.linalg.qr(b)
    qa, ra = np.linalg.qr(a.T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    k = min(rank, len(s))
    root = np.sqrt(s[:k])
    new_b = np.zeros((b.shape[0], rank))
    new_a = np.zeros((rank, a.shape[1]))
    new_b[:, :k] = (qb @ u[:, :k]) * root
    new_a[:k] = root[:, None] * (vt[:k] @ qa.T)
    new_b, new_a = revive_empty_components(new_b, new_a, nonzero_components(s, k))
    total = float(np.sum(s ** 2))
    residual = float(np.sqrt(np.sum(s[k:] ** 2) / total)) if total > 0 else 0.0
    return new_b, new_a, residual


def aggregate(replies: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int], *,
              rank: int) -> tuple[Arrays, float]:
    """The global adapter at ``rank`` and the largest per-layer truncation residual."""
    return aggregate_pairs(replies, num_examples,
                           lambda factors, w: refactor(*stack(factors, w), rank))
