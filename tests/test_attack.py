"""The attack simulator: each kind is an exact function of a known honest update; only
the configured fraction of simulated partitions attacks; a device never does."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedslm.client.agent import AgentConfig, write_node_config
from fedslm.client.attack import apply, hostile_update, malicious_partitions
from fedslm.config import AttackConfig

RECEIVED = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([[0.5]], np.float32)}
TRAINED = {"a": np.array([1.5, 1.0], np.float32), "b": np.array([[0.75]], np.float32)}  # delta .5 -1 .25


@pytest.mark.parametrize(("kind", "scale", "expected", "claimed"), [
    ("scale", 10.0, {"a": [6.0, -8.0], "b": [[3.0]]}, 7),
    ("sign_flip", 2.0, {"a": [0.0, 4.0], "b": [[0.0]]}, 7),
    ("same_value", -3.0, {"a": [-3.0, -3.0], "b": [[-3.0]]}, 7),
    ("num_examples", 1e12, {"a": [1.5, 1.0], "b": [[0.75]]}, 7 * 10**12),
])
def test_each_attack_is_an_exact_function_of_the_honest_update(kind, scale, expected, claimed):
    attack = AttackConfig(kind=kind, scale=scale)
    arrays, n = hostile_update(attack, TRAINED, RECEIVED, 7, partition_id=0, server_round=1)
    assert n == claimed
    for name, values in expected.items():
        np.testing.assert_array_equal(arrays[name], np.array(values, np.float32))
        assert arrays[name].dtype == np.float32


def test_gaussian_replaces_the_update_by_seeded_noise_around_the_global():
    attack = AttackConfig(kind="gaussian", scale=0.5)
    arrays, n = hostile_update(attack, TRAINED, RECEIVED, 7, partition_id=3, server_round=2)
    rng = np.random.default_rng([3, 2])
    np.testing.assert_array_equal(arrays["a"], RECEIVED["a"] + rng.normal(0, 0.5, 2).astype(np.float32))
    np.testing.assert_array_equal(arrays["b"], RECEIVED["b"] + rng.normal(0, 0.5, (1, 1)).astype(np.float32))
    assert n == 7


def test_the_first_fraction_of_partitions_attacks_from_start_round():
    attack = AttackConfig(kind="scale", fraction=0.2, start_round=2, scale=10.0)
    assert list(malicious_partitions(attack, 10)) == [0, 1]
    assert list(malicious_partitions(AttackConfig(fraction=0.3), 10)) == []  # kind none
    sim = {"partition-id": 1, "num-partitions": 10}
    metrics = {"num-examples": 7, "loss": 1.0}
    for pid, rnd, attacked in ((1, 2, True), (1, 1, False), (2, 2, False)):
        arrays, out = apply(attack, {**sim, "partition-id": pid}, TRAINED, RECEIVED, metrics,
                            partition_id=pid, server_round=rnd, num_clients=10)
        assert bool(arrays["a"][0] == 6.0) is attacked and out == metrics


def test_the_device_agent_cannot_enable_an_attack(tmp_path: Path):
    cfg = AgentConfig(superlink="10.0.0.5:9093", root_certificates=tmp_path / "ca.crt",
                      auth_key=tmp_path / "key", data_path=tmp_path, state_dir=tmp_path)
    node_config = tomllib.loads(write_node_config(cfg).read_text())
    attack = AttackConfig(kind="num_examples", fraction=1.0, scale=1e6)
    metrics = {"num-examples": 7}
    # a device seeded as partition 0, the first malicious one: still honest
    arrays, out = apply(attack, node_config, TRAINED, RECEIVED, metrics, partition_id=0,
                        server_round=1, num_clients=1)
    assert arrays is TRAINED and out == metrics
    arrays, out = apply(attack, {**node_config, "partition-id": 0}, TRAINED, RECEIVED, metrics,
                        partition_id=0, server_round=1, num_clients=1)
    assert arrays is TRAINED and out == metrics  # a state dir marks a device either way
