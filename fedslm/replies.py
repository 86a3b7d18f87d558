"""What a client reply may carry, and the bounds each value must respect.

Both sides import this: the client writes its replies with these keys, the server
screens every reply against them (``fedslm.server.screening``) before anything reads it. A
value outside these bounds is no honest client's: it is rejected with one line, never
allowed to reach Flower's strategies (which raise on inconsistent replies) or the
global adapter.
"""

from __future__ import annotations

import math

from fedslm.keys import (  # noqa: F401  (the keys themselves live in fedslm.keys)
    ARRAYS_KEY,
    BUDGET_EXHAUSTED,
    METRICS_KEY,
    STATUS_KEY,
    STATUS_RECORD,
    WEIGHT_KEY,
)

# Metrics that may be lists (of non-negative ints): a classification client's flattened
# confusion matrix. Every other metric is an int or float scalar.
LIST_METRICS = frozenset({"confusion", "personal_confusion"})
MAX_LIST_LEN = 256 * 256  # a confusion matrix of 256 classes
MAX_EXAMPLES = 2**53  # exact as a float; the round's weight cap (fedslm.server.screening) is lower
MAX_METRIC_ABS = 1e12  # any scalar metric
MAX_PARAM_ABS = 1e4  # any adapter value, sent or decoded (LoRA weights are O(1))

# Known metrics with a narrower range than MAX_METRIC_ABS: (low, high), both inclusive.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "loss": (0.0, 1e4),
    "tier-index": (-1, 2**31 - 1),  # a device's tier among peft.ranks' (fedslm.aggregation.ranks)
    "perplexity": (1.0, math.inf),
    "accuracy": (0.0, 1.0),
    "macro_f1": (0.0, 1.0),
    "rouge_l": (0.0, 1.0),
    "exact_match": (0.0, 1.0),
    "partition-id": (0, 2**31 - 1),
    "dp-epsilon": (0.0, math.inf),
    "dp-delta": (0.0, 1.0),
    "norm_bit": (0, 1),  # Flower's adaptiveclipping_mod: 1 if the client clipped
}
INT_METRICS = frozenset({WEIGHT_KEY, "partition-id", "norm_bit", "tier-index"})


def metric_problem(key: object, value: object) -> str | None:
    """Why ``key: value`` cannot be an honest client's metric (None: it can)."""
    if not isinstance(key, str):
        return f"metric key {key!r} is not a string"
    if isinstance(value, list):
        if key not in LIST_METRICS:
            return f"metric {key} is a list; only {sorted(LIST_METRICS)} may be"
        if len(value) > MAX_LIST_LEN:
            return f"metric {key} has {len(value)} entries, more than {MAX_LIST_LEN}"
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_METRIC_ABS
                   for v in value):
            return f"metric {key} must hold non-negative ints"
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"metric {key} is {type(value).__name__}, expected a number"
    if key in INT_METRICS and not isinstance(value, int):
        return f"metric {key} is {value!r}, expected an int"
    if not math.isfinite(value):
        return f"metric {key} is not finite"
    low, high = METRIC_RANGES.get(key, (-MAX_METRIC_ABS, MAX_METRIC_ABS))
    if not low <= value <= min(high, MAX_METRIC_ABS):
        return f"metric {key} is {value!r}, outside [{low:g}, {min(high, MAX_METRIC_ABS):g}]"
    return None


def weight_problem(value: object) -> str | None:
    """Why ``value`` cannot be an example count (None: it can)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_EXAMPLES:
        return f"bad {WEIGHT_KEY}: {value!r}"
    return None
