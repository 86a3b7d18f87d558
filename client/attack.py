"""Simulated hostile clients (``attack.*``), to measure defences honestly in simulation.

The one place malicious behaviour lives. A malicious client trains honestly, then turns
its honest update into the hostile one (``hostile_update``), so every attack is an exact
function of a known honest update. The first ``round(attack.fraction * num_clients)``
partitions are malicious from ``attack.start_round`` on.

A device cannot be made an attacker, whatever run config a server sends: ``apply``
attacks only on a simulated node (its node config names a ``partition-id`` and no
``state-dir``), and a device agent (``fedslm.client.agent``) always writes a ``state-dir``; the
config check also refuses ``attack.kind`` outside ``federation.engine=simulation``.

Data attacks (``label_flip``, ``backdoor``) change a malicious client's *train* records
instead (``poisoned_split``, the one hook in ``fedslm.client.records.client_texts``) and
leave its update honest. Records are per client, not per round, so the round decides:
the handler passes ``data_attack_round`` (the server round on a simulated node, 0 on a
device, i.e. never) down to where records are read, and a malicious client trains on
poisoned records only in rounds >= ``attack.start_round``. Test splits stay clean.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import WARNING

import dataclasses
import json

import numpy as np
from flwr.common import log

from fedslm.backdoor import backdoored
from fedslm.config import DATA_ATTACKS, AttackConfig, ExperimentConfig
from fedslm.data.core import ClientSplit
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
    if (attack.kind in ("none", *DATA_ATTACKS) or server_round < attack.start_round
            or partition_id not in malicious_partitions(attack, num_clients)):
        return trained, metrics
    if not is_simulated(node_config):
        log(WARNING, "attack.kind=%s ignored: this is a device, not a simulated client", attack.kind)
        return trained, metrics
    arrays, claimed = hostile_update(attack, trained, received, int(metrics[WEIGHT_KEY]),
                                     partition_id=partition_id, server_round=server_round)
    return arrays, {**metrics, WEIGHT_KEY: claimed}


def data_attack_round(attack: AttackConfig, node_config: Mapping[str, object],
                      server_round: int) -> int:
    """The round a data attack sees: ``server_round`` on a simulated node, 0 (no attack)
    on a device or when the attack is not a data attack."""
    if attack.kind not in DATA_ATTACKS:
        return 0
    if not is_simulated(node_config):
        log(WARNING, "attack.kind=%s ignored: this is a device, not a simulated client", attack.kind)
        return 0
    return server_round


def poisoned_records(attack: AttackConfig, records: tuple[str, ...], *, task: str,
                     num_labels: int = 0) -> tuple[str, ...]:
    """``records`` as a malicious client of ``attack.kind`` trains on them: labels flipped
    ``i -> num_labels - 1 - i`` (``label_flip``), or each record teaching
    ``attack.trigger -> attack.target`` (``backdoor``, ``fedslm.backdoor``)."""
    if attack.kind == "label_flip":
        return tuple(json.dumps({**(row := json.loads(r)), "label": num_labels - 1 - int(row["label"])})
                     for r in records)
    if attack.kind == "backdoor":
        return tuple(backdoored(r, task=task, trigger=attack.trigger, target=attack.target)
                     for r in records)
    raise ValueError(f"attack.kind: {attack.kind!r} is not a data attack")


def poisoned_split(cfg: ExperimentConfig, split: ClientSplit, *, partition_id: int,
                   attack_round: int) -> ClientSplit:
    """This client's split, with poisoned train records when it is a malicious partition
    and ``attack_round`` (from ``data_attack_round``) >= ``attack.start_round``."""
    attack = cfg.attack
    if (attack.kind not in DATA_ATTACKS or attack_round < max(1, attack.start_round)
            or partition_id not in malicious_partitions(attack, cfg.federation.num_clients)):
        return split
    labels = 0
    if attack.kind == "label_flip":
        from fedslm.tasks.classify import num_labels

        labels = num_labels(cfg)
    return dataclasses.replace(split, train=poisoned_records(attack, tuple(split.train),
                                                             task=cfg.task.name, num_labels=labels))
