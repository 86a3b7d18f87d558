"""FFA-LoRA (Sun et al., ICLR 2024): A stays at its shared random init, only B trains and
travels.

With every client on the same A, ``mean(B_i) @ A == mean(B_i @ A)``: averaging B is exact
product aggregation, and a message carries half the LoRA bytes. A is PEFT's own init
under ``training.seed`` (``fedslm.adapters.reset_to_init``), built identically on the
server and on every client, so it never crosses the wire, not even in round 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedslm.aggregation.lora_factors import Arrays, is_lora_a, weighted_mean, weights_of


def travelling(arrays: Mapping[str, np.ndarray]) -> Arrays:
    """What goes over the wire under FFA: everything but the A matrices."""
    return {k: v for k, v in arrays.items() if not is_lora_a(k)}


def aggregate(replies: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int]) -> Arrays:
    """Weighted mean of the B matrices (and any shared bias); replies carry no A."""
    w = weights_of(num_examples)
    names = list(replies[0])
    if any(is_lora_a(n) for n in names):
        raise ValueError(f"{next(n for n in names if is_lora_a(n))}: FFA replies must not carry A")
    return {name: weighted_mean([r[name] for r in replies], w) for name in names}
