"""An in-process SecAgg+ round between real client stage functions and the real server
state machine (no Flower), with hooks to drop clients and tamper with messages."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedslm.client import secagg as client
from fedslm.config import SecureAggregationConfig
from fedslm.secagg.protocol import threshold
from fedslm.server.secagg import SecAggRound


@dataclass
class Run:
    server: SecAggRound
    clients: dict[int, client.ClientRound]
    quantized: dict[int, np.ndarray]          # what each client put in (before masking)
    received: list = field(default_factory=list)  # every reply the server got, in order


def entropy(node: int, server_round: int = 1) -> bytes:
    return bytes([node % 256, server_round % 256]) * 16


def run_round(values: dict[int, np.ndarray], *, sa: SecureAggregationConfig, server_round: int = 1,
              drop_after_shares: set[int] = frozenset(), drop_before_unmask: set[int] = frozenset(),
              tamper: Callable[[str, int, object], object] | None = None,
              seeded: bool = True) -> tuple[Run, np.ndarray]:
    """``values``: node -> already-quantized vector. Returns the run and the unmasked sum;
    raises ``fedslm.server.secagg.Abandoned`` as the server does."""
    tamper = tamper or (lambda stage, node, reply: reply)
    nodes = sorted(values)
    size = next(iter(values.values())).size
    server = SecAggRound(sa, server_round, nodes, size, rng=random.Random(7))
    run = Run(server, {}, dict(values))

    def got(stage: str, node: int, reply):
        reply = tamper(stage, node, reply)
        run.received.append((stage, node, reply))
        return reply

    replies = {}
    for node in nodes:
        state, adv = client.advertise_keys(server_round, node, entropy=entropy(node, server_round) if seeded else None)
        run.clients[node] = state
        replies[node] = got("keys", node, (adv["pk-enc"], adv["pk-mask"], adv["commit"]))
    peers = server.on_keys(replies)
    t = threshold(sa, len(nodes))
    replies = {node: got("shares", node, client.share_keys(run.clients[node], p, threshold=t, expected_threshold=t))
               for node, p in peers.items()}
    inbox = server.on_shares(replies)
    replies, undecryptable = {}, {}
    for node, cts in inbox.items():
        undecryptable[node] = client.receive_shares(run.clients[node], cts)
        if node in drop_after_shares:
            continue
        replies[node] = got("masked", node, client.mask(run.clients[node], values[node], modulus_bits=sa.modulus_bits))
    plan = server.on_masked(replies, undecryptable)
    replies = {node: got("unmask", node, client.reveal(run.clients[node], *lists))
               for node, lists in plan.items() if node not in drop_before_unmask}
    return run, server.on_unmask(replies)
