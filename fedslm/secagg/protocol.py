"""What the SecAgg+ stages are called on the wire and the round parameters both sides
derive from the config: neighbourhoods and the reconstruction threshold.

Each stage is its own Message-API round trip, a ``train.<action>`` message with a
``secagg`` ConfigRecord (stage 3 also carries the strategy's ``arrays`` and ``config``):

1. ``keys``    server -> client: round parameters;  client -> server: two public keys
               and a commitment to its self-mask seed (weighted: and, in a ``metrics``
               record, its example count and partition id, in clear).
2. ``shares``  server -> client: its neighbours' public keys;  client -> server: Shamir
               shares of its self-mask seed and masking key, encrypted per neighbour.
3. ``masked``  server -> client: the global adapter and the ciphertexts addressed to it
               (weighted: its capped weight and the round's largest);
               client -> server: its clipped, (weighted,) quantized (noised) update, masked.
4. ``unmask``  server -> client: which neighbours survived and which dropped;
               client -> server: self-mask shares of survivors, key shares of the dropped.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from fedslm.config import ExperimentConfig, SecureAggregationConfig

STAGES = ("keys", "shares", "masked", "unmask")
MESSAGE_TYPES = {stage: f"train.secagg_{stage}" for stage in STAGES}
RECORD = "secagg"          # ConfigRecord of every stage, both directions
MASKED_KEY = "masked"      # ArrayRecord of stage 3's reply
MASKED_ARRAY = "vector"    # its one array

# keys inside the ``secagg`` record
STAGE, ROUND, SELF_ID = "stage", "round", "self-id"
PK_ENC, PK_MASK, COMMIT = "pk-enc", "pk-mask", "commit"
PEERS = "peers"            # node ids (stage 2: neighbours; stage 3: senders; stage 4: ...)
DROPPED = "dropped"        # stage 4: neighbours whose masked input is missing
CIPHERTEXTS = "ciphertexts"
DESTINATIONS = "destinations"
SHARE_OWNERS, SHARES = "share-owners", "shares"       # stage 4 reply: owner id, share
KEY_OWNERS, KEY_SHARES = "key-owners", "key-shares"
UNDECRYPTABLE = "undecryptable"                       # stage 3 reply: senders ignored
THRESHOLD, NEIGHBOURHOOD, NUM_SAMPLED = "threshold", "neighbourhood", "num-sampled"
WEIGHT, WEIGHT_MAX = "weight", "weight-max"           # stage 3 request, weighted rounds only


def weighted(cfg: ExperimentConfig) -> bool:
    """Whether clients scale their updates by their capped example counts
    (``secure_aggregation.weighting``; ``auto``: as plain aggregation weights)."""
    w = cfg.secure_aggregation.weighting
    return w == "examples" or (w == "auto" and not cfg.privacy.user_level)


def neighbourhood_size(cfg: SecureAggregationConfig, sampled: int) -> int:
    """Clients whose shares of one secret exist: the owner and its neighbours."""
    others = sampled - 1 if cfg.num_neighbours == 0 else min(cfg.num_neighbours, sampled - 1)
    return others + 1


def threshold(cfg: SecureAggregationConfig, sampled: int) -> int:
    """Shares needed to reconstruct a secret, and the fewest masked inputs a round sums
    (the distributed DP noise is calibrated to it)."""
    size = neighbourhood_size(cfg, sampled)
    t = cfg.threshold or math.ceil(cfg.threshold_fraction * size)
    return max(2, min(t, size))


@dataclass(frozen=True)
class Graph:
    """The k-regular neighbour graph of one round: a ring in a random order, each client
    linked to the k/2 on either side (all others when k = 0 or k >= n - 1)."""

    neighbours: dict[int, tuple[int, ...]]

    @classmethod
    def build(cls, nodes: list[int], num_neighbours: int, rng: random.Random) -> "Graph":
        order = sorted(nodes)
        rng.shuffle(order)
        n = len(order)
        if num_neighbours == 0 or num_neighbours >= n - 1:
            return cls({v: tuple(sorted(set(order) - {v})) for v in order})
        half = num_neighbours // 2
        links: dict[int, set[int]] = {v: set() for v in order}
        for pos, v in enumerate(order):
            for step in range(1, half + 1):
                links[v] |= {order[(pos + step) % n], order[(pos - step) % n]}
        return cls({v: tuple(sorted(peers)) for v, peers in links.items()})
