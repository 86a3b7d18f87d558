"""Partitioners: deterministic, disjoint, covering; errors name the client or key."""

from __future__ import annotations

from collections import Counter

import datasets
import pytest

from fedslm.config import DataConfig
from fedslm.data import ClientSplit, DataError, build_federated_texts, load_client_split
from fedslm.data.federated import _cached_texts
from fedslm.data.partition import partition_texts


def labelled(sizes: dict[str, int]) -> datasets.Dataset:
    """Texts '<key>-<n>' with key column 'k', keys interleaved so no partitioner sees runs."""
    rows = [(k, n) for n in range(max(sizes.values())) for k in sizes if n < sizes[k]]
    return datasets.Dataset.from_dict({"text": [f"{k}-{n}" for k, n in rows], "k": [k for k, _ in rows]})


def cfg(partitioner: str, **overrides) -> DataConfig:
    base = dict(source="text_files", path="unused", partitioner=partitioner, partition_key="k")
    return DataConfig(**(base | overrides))


def texts_of(clients: tuple[ClientSplit, ...]) -> list[str]:
    return [t for c in clients for t in c.train + c.test]


SIZES = {"a": 20, "b": 17, "c": 13, "d": 10}


@pytest.mark.parametrize(
    ("partitioner", "shapes"),
    [
        ("iid", [(16, 4), (16, 4), (16, 4)]),
        ("dirichlet", [(12, 3), (17, 4), (19, 5)]),
        ("natural", [(16, 4), (14, 3), (10, 3)]),
    ],
)
def test_partitions_are_deterministic_disjoint_and_cover_the_data(partitioner, shapes):
    ds = labelled(SIZES)
    clients = partition_texts(ds, cfg(partitioner, dirichlet_alpha=1.0), num_clients=3)[0]
    assert clients == partition_texts(ds, cfg(partitioner, dirichlet_alpha=1.0), num_clients=3)[0]
    assert [(len(c.train), len(c.test)) for c in clients] == shapes
    pooled = texts_of(clients)
    assert len(pooled) == len(set(pooled))
    kept = ds["text"][:] if partitioner != "natural" else [t for t in ds["text"] if t[0] != "d"]
    assert sorted(pooled) == sorted(kept)


def test_natural_gives_the_largest_groups_in_order_and_drops_the_rest():
    clients = partition_texts(labelled(SIZES), cfg("natural"), num_clients=3)[0]
    assert [{t.split("-")[0] for t in c.train + c.test} for c in clients] == [{"a"}, {"b"}, {"c"}]


def test_seed_changes_iid_and_dirichlet_assignment():
    ds = labelled(SIZES)
    for name in ("iid", "dirichlet"):
        first = partition_texts(ds, cfg(name, seed=0), num_clients=3)[0]
        assert first != partition_texts(ds, cfg(name, seed=1), num_clients=3)[0]


def mean_majority_share(alpha: float) -> float:
    clients = partition_texts(labelled(SIZES), cfg("dirichlet", dirichlet_alpha=alpha), num_clients=3)[0]
    shares = [Counter(t[0] for t in c.train + c.test).most_common(1)[0][1] / len(c.train + c.test)
              for c in clients]
    return sum(shares) / len(shares)


def test_dirichlet_small_alpha_skews_each_clients_key_mix():
    assert mean_majority_share(0.1) > 0.7  # mostly one key per client
    assert mean_majority_share(100.0) < 0.34  # the 4 keys in their global proportions


@pytest.mark.parametrize(
    ("config", "num_clients", "message"),
    [
        (cfg("natural"), 5, r"^federation\.num_clients: 5 clients but only 4 distinct values"),
        (cfg("iid"), 61, r"^federation\.num_clients: 61 clients but only 60 texts$"),
        (cfg("dirichlet"), 31, r"^federation\.num_clients: 31 clients need at least 62 texts"),
        (cfg("natural", partition_key="user"), 2,
         r"^data\.partition_key: no column 'user' \(columns: text, k\)$"),
        (cfg("dirichlet", partition_key="user"), 2, r"^data\.partition_key: no column 'user'"),
    ],
)
def test_impossible_partitions_name_the_key(config, num_clients, message):
    with pytest.raises(DataError, match=message):
        partition_texts(labelled(SIZES), config, num_clients=num_clients)[0]


def test_a_client_left_without_test_texts_is_named():
    ds = labelled({"a": 5, "b": 4, "c": 1})
    message = r"^federation\.num_clients: client 2 has no test texts \(1 in total\); use fewer clients"
    with pytest.raises(DataError, match=message):
        partition_texts(ds, cfg("natural"), num_clients=3)[0]


def test_key_values_must_all_be_present():
    ds = datasets.Dataset.from_dict({"text": ["x", "y", "z"], "k": ["a", None, "b"]})
    with pytest.raises(DataError, match=r"^data\.partition_key: 1 of 3 records have no 'k'$"):
        partition_texts(ds, cfg("natural"), num_clients=2)[0]


def test_text_files_partitioned_by_file_through_the_public_api(tmp_path):
    for name, n in (("x.txt", 6), ("y.txt", 4), ("z.txt", 3)):
        (tmp_path / name).write_text("\n\n".join(f"{name}-{i}" for i in range(n)))
    config = DataConfig(source="text_files", path=str(tmp_path), partitioner="natural",
                        partition_key="source_file", test_fraction=0.25)
    texts = build_federated_texts(config, num_clients=2)
    assert [(len(c.train), len(c.test)) for c in texts.clients] == [(4, 2), (3, 1)]
    assert {t.split("-")[0] for t in texts_of(texts.clients[:1])} == {"x.txt"}
    assert texts.public == ()
    # round-robin over the clients' test texts: first of each client, then second of each
    first, second = texts.clients
    assert texts.central_test == (first.test[0], second.test[0], first.test[1])

    _cached_texts.cache_clear()
    assert load_client_split(config, num_clients=2, partition_id=1) == texts.clients[1]
    assert load_client_split(config, num_clients=2, partition_id=0) == texts.clients[0]
    assert _cached_texts.cache_info().misses == 1 and _cached_texts.cache_info().hits == 1
    message = r"^partition_id: 2 is outside 0\.\.1 \(federation\.num_clients=2\)$"
    with pytest.raises(DataError, match=message):
        load_client_split(config, num_clients=2, partition_id=2)
