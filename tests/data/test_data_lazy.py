"""Large synthetic federations: a client's split, the central test set and the preflight
check cost the same at 10 or 10,000 clients (nothing builds every client)."""

from __future__ import annotations

import pytest

import fedslm.simulations.preflight as preflight
from fedslm.config import DataConfig, ExperimentConfig
from fedslm.data import build_federated_texts, central_test_texts, load_client_split
from fedslm.data import federated


@pytest.fixture
def no_full_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything builds every client's texts."""

    def refuse(*args, **kwargs):
        raise AssertionError("built every client's texts")

    monkeypatch.setattr(federated, "build_synthetic", refuse)
    monkeypatch.setattr(federated, "_cached_texts", refuse)
    monkeypatch.setattr(preflight, "build_federated_texts", refuse)


def test_one_client_of_ten_thousand_is_the_same_client_as_in_a_small_federation() -> None:
    small = build_federated_texts(DataConfig(), num_clients=12)
    alone = load_client_split(DataConfig(), num_clients=10_000, partition_id=3)
    assert alone == small.clients[3]
    assert (len(alone.train), len(alone.test)) == (38, 10)


def test_loading_a_client_and_the_central_set_never_builds_the_federation(no_full_build) -> None:
    split = load_client_split(DataConfig(seed=5), num_clients=10_000, partition_id=9_999)
    assert len(split.train) == 38
    central = central_test_texts(DataConfig(seed=5), num_clients=10_000)
    assert len(central) == 64 and len(set(central)) == 64


@pytest.mark.parametrize("num_clients", [1, 10, 64])
def test_central_set_matches_the_full_build_for_small_federations(num_clients: int) -> None:
    full = build_federated_texts(DataConfig(), num_clients=num_clients)
    assert central_test_texts(DataConfig(), num_clients=num_clients) == full.central_test
    assert len(full.central_test) == num_clients * max(1, 64 // num_clients)


def test_central_set_is_capped_at_64_documents_from_the_first_64_clients() -> None:
    big = central_test_texts(DataConfig(), num_clients=1_000)
    assert big == central_test_texts(DataConfig(), num_clients=64)


def test_preflight_samples_a_spread_of_clients_in_large_federations(no_full_build) -> None:
    assert preflight.sampled_partitions(10_000) == [0, 1428, 2857, 4285, 5714, 7142, 8571, 9999]
    assert preflight.sampled_partitions(5) == [0, 1, 2, 3, 4]
    cfg = ExperimentConfig.from_dict({"federation": {"num_clients": 10_000},
                                      "strategy": {"fraction_train": 0.001}})
    preflight.check_data(cfg)  # would raise if it built all 10,000 clients


def test_preflight_still_checks_every_client_of_a_small_federation(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(preflight, "build_federated_texts",
                        lambda cfg, num_clients, task="causal_lm": calls.append(num_clients) or
                        build_federated_texts(cfg, num_clients=num_clients))
    preflight.check_data(ExperimentConfig.from_dict({"federation": {"num_clients": 100}}))
    assert calls == [100]
