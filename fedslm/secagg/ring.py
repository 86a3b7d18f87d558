"""Turning an adapter update into a vector of the ring Z_M (M = 2^modulus_bits) and the
unmasked sum back into a mean update.

Flower's SecAgg+ quantization scheme (``flwr.common.secure_aggregation.quantization``):
clip each value to [-c, c], shift by c, scale to [0, T] (T = 2^quantization_bits) and
round stochastically, so the rounding is unbiased. It is re-stated here with an explicit
generator because Flower's draws from numpy's global RNG, which the run seeds from its
public config. ``M > n * T`` keeps the sum of n honest vectors from wrapping around.
"""

from __future__ import annotations

import numpy as np


def flatten(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays]) if arrays \
        else np.zeros(0)


def unflatten(vector: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    out, start = [], 0
    for ref in like:
        out.append(vector[start:start + ref.size].reshape(ref.shape).astype(ref.dtype))
        start += ref.size
    if start != vector.size:
        raise ValueError(f"vector has {vector.size} values, the arrays hold {start}")
    return out


def clip_l2(vector: np.ndarray, norm: float) -> tuple[np.ndarray, bool]:
    """``vector`` scaled down to L2 norm ``norm`` if longer; True if it was."""
    length = float(np.linalg.norm(vector))
    if length <= norm:
        return vector, False
    return vector * (norm / length), True


def quantize(vector: np.ndarray, *, clipping_range: float, quantization_bits: int,
             rng: np.random.Generator) -> np.ndarray:
    """Values in [0, 2^quantization_bits] (uint64), unbiased for values inside [-c, c]."""
    target = float(1 << quantization_bits)
    scaled = (np.clip(vector, -clipping_range, clipping_range) + clipping_range) * (
        target / (2 * clipping_range))
    low = np.floor(scaled)
    up = rng.random(vector.shape) < (scaled - low)
    return (low + up).astype(np.uint64)


def dequantize_sum(total: np.ndarray, count: int, *, clipping_range: float,
                   quantization_bits: int) -> np.ndarray:
    """The sum of ``count`` quantized vectors back in float: the sum of their values."""
    step = 2 * clipping_range / float(1 << quantization_bits)
    return total.astype(np.float64) * step - count * clipping_range


def in_sum_range(total: np.ndarray, count: int, *, quantization_bits: int) -> bool:
    """Whether an unmasked sum could be the sum of ``count`` honest vectors."""
    return bool(total.size == 0 or int(total.max()) <= count * (1 << quantization_bits))


def add_mod(a: np.ndarray, b: np.ndarray, modulus_bits: int) -> np.ndarray:
    return (a + b) & np.uint64((1 << modulus_bits) - 1) if modulus_bits < 64 else a + b


def sub_mod(a: np.ndarray, b: np.ndarray, modulus_bits: int) -> np.ndarray:
    return (a - b) & np.uint64((1 << modulus_bits) - 1) if modulus_bits < 64 else a - b
