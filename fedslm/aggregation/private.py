"""DP-FedAvg for every aggregation rule: clip and noise what the rule actually aggregates.

A client's contribution is its delta against what *it* was sent (its rank's slice with
``peft.ranks``), in the space its rule averages:

- factor rules (``fedavg``, ``ffa``): the tensors themselves, zero-padded to the global
  rank (a rank-r client's padded delta has the norm of its own delta);
- product rules (``flora``, ``flexlora``): per LoRA layer the dense product delta
  ``B_i A_i - B_s A_s`` (``out x in``), and any other tensor (a head, biases) as is.

Every client's whole delta (all layers, all tensors, one vector) is clipped to L2 norm
``C``; the equal-weight mean of the m clipped deltas gets Gaussian noise of standard
deviation ``z * C / m`` on every coordinate, and is added to the mean of what the
clients were sent (data-independent: the last release and the public rank assignment).
So one client moves the released vector by at most ``C / m`` (``2C / m`` replacing it),
the sensitivity the server's accountant assumes for ``fedavg``: the same z, C and m give
the same epsilon under every rule. For product rules the noised mean product is then
re-factored by SVD at the global rank, which is post-processing. With no clipping and
no noise each function reduces to its rule's plain aggregate at equal weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedslm.aggregation.flexlora import svd_factors
from fedslm.aggregation.lora_factors import Arrays, lora_pairs, pad, product

Float64 = dict[str, np.ndarray]


def factor_delta(reply: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], rank: int) -> Float64:
    """``pad(reply) - pad(sent)`` at ``rank``, float64 (fedavg, ffa)."""
    r, s = pad(reply, rank), pad(sent, rank)
    return {n: np.asarray(r[n], np.float64) - np.asarray(s[n], np.float64) for n in s}


def product_delta(reply: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> Float64:
    """Per LoRA layer (keyed by its A name) ``B A - B_s A_s``; other tensors ``reply - sent``."""
    pairs = lora_pairs(list(sent))
    paired = set(pairs) | set(pairs.values())
    out = {n: np.asarray(reply[n], np.float64) - np.asarray(sent[n], np.float64) for n in sent if n not in paired}
    for a, b in pairs.items():
        out[a] = product(reply[b], reply[a]) - product(sent[b], sent[a])
    return out


def sent_products(sent: Mapping[str, np.ndarray]) -> Float64:
    """What a client was sent, in product space (the base its product delta is added to)."""
    pairs = lora_pairs(list(sent))
    paired = set(pairs) | set(pairs.values())
    out = {n: np.asarray(sent[n], np.float64) for n in sent if n not in paired}
    out.update({a: product(sent[b], sent[a]) for a, b in pairs.items()})
    return out


def l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all tensors together (Frobenius for matrices)."""
    return float(np.sqrt(sum(float(np.sum(np.square(v))) for v in delta.values())))


def clip(delta: Mapping[str, np.ndarray], bound: float) -> tuple[Float64, float]:
    """``delta`` scaled to L2 norm at most ``bound``, and its norm before clipping."""
    norm = l2_norm(delta)
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {n: v * scale for n, v in delta.items()}, norm


def noised_mean(
    deltas: Sequence[Mapping[str, np.ndarray]], *, clip_norm: float, noise_multiplier: float, rng: np.random.Generator
) -> tuple[Float64, list[float]]:
    """Equal-weight mean of the clipped deltas plus N(0, (z C / m)^2) on every coordinate
    (drawn tensor by tensor, in the first delta's order); and each delta's norm."""
    m = len(deltas)
    clipped, norms = zip(*(clip(d, clip_norm) for d in deltas))
    std = noise_multiplier * clip_norm / m
    out = {}
    for name in clipped[0]:
        mean = sum(c[name] for c in clipped) / m
        out[name] = mean + rng.normal(0.0, std, size=np.shape(mean)) if std > 0 else mean
    return out, list(norms)


def private_aggregate(
    replies: Sequence[Mapping[str, np.ndarray]],
    sent: Sequence[Mapping[str, np.ndarray]],
    *,
    product_space: bool,
    rank: int,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> tuple[Arrays, float, list[float]]:
    """The DP release of one round: (global adapter at ``rank``, truncation residual,
    each client's delta norm before clipping). ``sent[i]`` is what reply i's node was sent."""
    if len(replies) != len(sent) or not replies:
        raise ValueError(f"{len(replies)} replies but {len(sent)} sent adapters")
    m = len(replies)
    if product_space:
        return _product_release(
            replies, sent, rank=rank, clip_norm=clip_norm, noise_multiplier=noise_multiplier, rng=rng
        )
    padded = [pad(s, rank) for s in sent]
    base = {n: sum(np.asarray(p[n], np.float64) for p in padded) / m for n in padded[0]}
    noisy, norms = noised_mean(
        [factor_delta(r, s, rank) for r, s in zip(replies, sent)],
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        rng=rng,
    )
    return {n: (base[n] + noisy[n]).astype(np.float32) for n in replies[0]}, 0.0, norms


def _product_release(
    replies, sent, *, rank: int, clip_norm: float, noise_multiplier: float, rng: np.random.Generator
) -> tuple[Arrays, float, list[float]]:
    """Layer by layer, so only one dense ``out x in`` product is held at a time (per
    client while measuring norms, then the layer's noised mean): memory O(out * in), not
    O(clients * layers * out * in). Noise is drawn tensor by tensor in the order of the
    sent names (a layer at its A's position)."""
    m = len(replies)
    pairs = lora_pairs(list(sent[0]))
    partners = set(pairs.values())

    def value(name: str, arrays) -> np.ndarray:  # a layer's product, or the tensor itself
        if name in pairs:
            return product(arrays[pairs[name]], arrays[name])
        return np.asarray(arrays[name], np.float64)

    def delta(name: str, r, s) -> np.ndarray:
        return value(name, r) - value(name, s)

    names = [n for n in sent[0] if n not in partners]
    norms = [
        float(np.sqrt(sum(float(np.sum(np.square(delta(n, r, s)))) for n in names))) for r, s in zip(replies, sent)
    ]
    scales = [min(1.0, clip_norm / n) if n > 0 else 1.0 for n in norms]
    std = noise_multiplier * clip_norm / m
    out: Arrays = {}
    worst = 0.0
    for name in names:
        mean: np.ndarray = (
            np.sum([value(name, s) + k * delta(name, r, s) for r, s, k in zip(replies, sent, scales)], axis=0) / m
        )
        if std > 0:
            mean = mean + rng.normal(0.0, std, size=mean.shape)
        if name in pairs:
            new_b, new_a, residual = svd_factors(mean, rank)
            out[name], out[pairs[name]] = new_a.astype(np.float32), new_b.astype(np.float32)
            worst = max(worst, residual)
        else:
            out[name] = mean.astype(np.float32)
    return {n: out[n] for n in replies[0]}, worst, norms
