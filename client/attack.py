"""Simulated hostile clients (``attack.*``), to measure defences honestly in simulation.

The one place malicious behaviour lives. A malicious client trains honestly, then turns
its honest update into the hostile one (``hostile_update``), so every attack is an exact
function of a known honest update. The first ``round(attack.fraction * num_clients)``
partitions are malicious from ``attack.start_round`` on.

A device cannot be made an attacker, whatever run config a server sends: ``apply``
attacks only on a simulated node (its node config names a ``partition-id`` and no
``state-dir``), and a device agent (``fedslm.client.agent``) always writes a ``state-dir``; the
config check also refuses ``attack.kind`` outside ``federation.engine=simulation``.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import WARNING

import numpy as np
from flwr.common import log

from fedslm.config import AttackConfig
from fedslm.replies import WEIGHT_KEY

Arrays = dict[str, np.ndarray]


def malicious_partitions(attack: AttackConfig, num_clients: int) -> range:
    """The partitions that attack: the first ``round(fraction * num_clients)``."""
    if attack.kind == "none":
        return range(0)
    return range(int(round(attack.fraction * num_clients)))


def is_simulated(node_config: Mapping[str, object]) -> bool:
    return "partition-id" in node_config and "state-dir" not in node_config


def hostile_update(attack: AttackConfig, trained: Mapping[str, np.ndarray],
                   received: Mapping[str, np.ndarray], num_examples: int, *,
                   partition_id: int, server_round: int) -> tuple[Arrays, int]:
    """(adapter, example count) a client of ``attack.kind`` sends instead of its honest
    ``trained`` adapter and ``num_examples``; ``received`` is the global it was sent."""
    s, kind = attack.scale, attack.kind
    base = {n: np.asarray(received[n], np.float32) for n in received}
    delta = {n: np.asarray(trained[n], np.float32) - base[n] for n in base}
    if kind == "scale":
        return {n: base[n] + np.float32(s) * delta[n] for n in base}, num_examples
    if kind == "sign_flip":
        return {n: base[n] - np.float32(s) * delta[n] for n in base}, num_examples
    if kind == "gaussian":
        rng = np.random.default_rng([partition_id, server_round])
        return {n: base[n] + rng.normal(0.0, s, base[n].shape).astype(np.float32)
                for n in sorted(base)}, num_examples
    if kind == "same_value":
        return {n: np.full(base[n].shape, s, np.float32) for n in base}, num_examples
    if kind == "num_examples":
        return {n: np.asarray(trained[n], np.float32) for n in base}, int(round(num_examples * s))
    raise ValueError(f"attack.kind: no hostile update for {kind!r}")


def apply(attack: AttackConfig, node_config: Mapping[str, object], trained: Arrays,
          received: Arrays, metrics: dict, *, partition_id: int, server_round: int,
          num_clients: int) -> tuple[Arrays, dict]:
    """The update and metrics this client sends: hostile when it is one of the malicious
    simulated partitions and the attack has started, its honest ones otherwise."""
    if (attack.kind == "none" or server_round < attack.start_round
            or partition_id not in malicious_partitions(attack, num_clients)):
        return trained, metrics
    if not is_simulated(node_config):
        log(WARNING, "attack.kind=%s ignored: this is a device, not a simulated client", attack.kind)
        return trained, metrics
    arrays, claimed = hostile_update(attack, trained, received, int(metrics[WEIGHT_KEY]),
                                     partition_id=partition_id, server_round=server_round)
    return arrays, {**metrics, WEIGHT_KEY: claimed}
