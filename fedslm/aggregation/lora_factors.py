"""LoRA factors as numpy: which tensors pair up, and the products and sizes they stand for.

A LoRA layer's update is ``scale * B @ A`` with ``A`` of shape ``(r, in)`` and ``B`` of
shape ``(out, r)`` (PEFT's embedding variants use the same rank axes). Names are PEFT's
checkpoint names; ``A``'s and ``B``'s names differ only in ``lora_A``/``lora_B``. The
scale ``alpha / r`` is the same for every client (all clients build the model at
``peft.r``), so every rule here works on ``B @ A`` and the scale cancels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Arrays = dict[str, np.ndarray]
_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))


def is_lora_a(name: str) -> bool:
    return any(a in name.split(".") for a, _ in _PAIRS)


def is_lora_b(name: str) -> bool:
    return any(b in name.split(".") for _, b in _PAIRS)


def lora_pairs(names: Sequence[str]) -> dict[str, str]:
    """``{A name: B name}`` for every LoRA layer among ``names``; an A without its B fails."""
    present = set(names)
    pairs = {}
    for name in names:
        parts = name.split(".")
        for a, b in _PAIRS:
            if a in parts:
                partner = ".".join(b if p == a else p for p in parts)
                if partner not in present:
                    raise ValueError(f"{name}: no matching {b} tensor")
                pairs[name] = partner
    return pairs


def weights_of(num_examples: Sequence[int]) -> np.ndarray:
    """Example counts -> weights summing to 1 (float64)."""
    w = np.asarray(num_examples, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w <= 0).any():
        raise ValueError(f"weights must be positive counts, got {list(num_examples)}")
    return w / w.sum()


def weighted_mean(values: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """``sum_i w_i v_i`` in float64, returned as float32."""
    return sum(w * np.asarray(v, np.float64) for w, v in zip(weights, values)).astype(np.float32)


def product(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    return np.asarray(b, np.float64) @ np.asarray(a, np.float64)


def rank_of(arrays: Mapping[str, np.ndarray]) -> int:
    """The LoRA rank of an adapter (its A tensors' first axis; all layers share one rank)."""
    ranks = {np.shape(v)[0] for k, v in arrays.items() if is_lora_a(k)}
    if len(ranks) != 1:
        raise ValueError(f"adapter has LoRA ranks {sorted(ranks)}; expected exactly one")
    return ranks.pop()


def truncate(arrays: Mapping[str, np.ndarray], rank: int) -> Arrays:
    """The first ``rank`` components of every LoRA layer (A's rows, B's columns); other
    tensors unchanged. For SVD-ordered factors this is the best rank-``rank`` approximation."""
    out = {}
    for name, value in arrays.items():
        value = np.asarray(value)
        if is_lora_a(name):
            out[name] = np.ascontiguousarray(value[:rank])
        elif is_lora_b(name):
            out[name] = np.ascontiguousarray(value[:, :rank])
        else:
            out[name] = value
    return out


def pad(arrays: Mapping[str, np.ndarray], rank: int) -> Arrays:
    """Zero-pad every LoRA layer to ``rank`` components (HetLoRA): ``B @ A`` is unchanged,
    and the padded components get exactly zero gradient (A's zero rows zero B's columns'
    gradient and vice versa), so plain training keeps them zero."""
    out = {}
    for name, value in arrays.items():
        value = np.asarray(value)
        if is_lora_a(name) and value.shape[0] < rank:
            out[name] = np.pad(value, ((0, rank - value.shape[0]), (0, 0)))
        elif is_lora_b(name) and value.shape[1] < rank:
            out[name] = np.pad(value, ((0, 0), (0, rank - value.shape[1])))
        else:
            out[name] = value
    return out


def shapes_of(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in arrays.items()}


def fit_to_shapes(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> Arrays:
    """``arrays`` cut back to ``shapes`` (the rank a client was sent), names kept."""
    return {name: np.ascontiguousarray(np.asarray(arrays[name])[tuple(slice(0, n) for n in shape)])
            for name, shape in shapes.items()}


def float32_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of the tensors as float32 (the wire format's payload, headers excluded)."""
    return sum(int(np.prod(np.shape(v))) * 4 for v in arrays.values())


def revive_empty_components(b: np.ndarray, a: np.ndarray, used: int) -> tuple[np.ndarray, np.ndarray]:
    """Components ``used:`` of re-factored factors (ones the product does not have, up
    to rounding): B's columns set to zero and A's rows given fresh random values, so
    training can use them again;
    ``B @ A`` is unchanged. Zero rows in both factors would get zero gradient forever.
    The scale is the kept rows' mean norm (or ``1/sqrt(in)``); seeded by the shape."""
    if used >= a.shape[0]:
        return b, a
    norms = np.linalg.norm(a[:used], axis=1) if used else np.array([])
    scale = float(norms.mean()) if used and norms.mean() > 0 else 1.0 / np.sqrt(a.shape[1])
    rng = np.random.default_rng(a.shape[0] * 1_000_003 + a.shape[1])
    fresh = rng.standard_normal((a.shape[0] - used, a.shape[1]))
    a, b = a.copy(), b.copy()
    a[used:] = fresh / np.linalg.norm(fresh, axis=1, keepdims=True) * scale
    b[:, used:] = 0.0
    return b, a


def nonzero_components(s: np.ndarray, k: int) -> int:
    """How many of the first ``k`` singular values are not zero up to float rounding."""
    if len(s) == 0 or s[0] <= 0:
        return 0
    return int(np.sum(s[:k] > s[0] * 1e-9))


def aggregate_pairs(replies: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int],
                    factorize) -> tuple[Arrays, float]:
    """The shared loop of the product-exact rules: each (A, B) pair of the replies becomes
    new factors by ``factorize(pairs, weights) -> (B, A, residual)``; any other tensor (a
    task head, biases) is the weighted mean. Returns the adapter and the largest residual."""
    w = weights_of(num_examples)
    pairs = lora_pairs(list(replies[0]))
    paired = set(pairs) | set(pairs.values())
    out: Arrays = {n: weighted_mean([r[n] for r in replies], w) for n in replies[0] if n not in paired}
    worst = 0.0
    for a_name, b_name in pairs.items():
        b, a, residual = factorize([(r[b_name], r[a_name]) for r in replies], w)
        out[a_name], out[b_name] = a.astype(np.float32), b.astype(np.float32)
        worst = max(worst, residual)
    return {n: out[n] for n in replies[0]}, worst
