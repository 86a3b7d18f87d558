"""The two calls the apps make: build every client's texts, or load one client's.

Non-synthetic sources are imported on first use: ``datasets``/``flwr_datasets`` take
seconds to import, and the synthetic path (default, and the builtin tokenizer's corpus)
needs neither.
"""

from __future__ import annotations

import dataclasses
import functools

from fedslm.config import DataConfig
from fedslm.data.core import ClientSplit, DataError, FederatedTexts, sample_central_test
from fedslm.data.synthetic import build_synthetic, synthetic_central_test, synthetic_client

ConfigKey = tuple[tuple[str, object], ...]


def build_federated_texts(cfg: DataConfig, *, num_clients: int) -> FederatedTexts:
    """All clients' train/test texts (index = partition id), public and central test texts.

    ``central_test`` is separately drawn for ``synthetic``; for other sources it is a
    round-robin sample of up to 64 client *test* texts (never trained on, but also used
    by the clients' own evaluation). ``data.partitioner`` applies to text_files and hf;
    synthetic clients are generated and shakespeare clients are speakers.
    """
    cfg.check("data")
    if num_clients < 1:
        raise DataError(f"federation.num_clients: must be >= 1, got {num_clients}")
    if cfg.source == "synthetic":
        return build_synthetic(cfg, num_clients=num_clients)
    if cfg.source == "shakespeare":
        from fedslm.data.shakespeare import build_shakespeare

        return build_shakespeare(cfg, num_clients=num_clients)
    from fedslm.data.partition import partition_texts
    from fedslm.data.sources import load_source

    clients = partition_texts(load_source(cfg), cfg, num_clients=num_clients)
    return FederatedTexts(clients=clients, public=(), central_test=sample_central_test(clients))


def load_client_split(cfg: DataConfig, *, num_clients: int, partition_id: int) -> ClientSplit:
    """One client's split.

    Synthetic clients are generated alone (each has its own seeded stream), so a
    process serving a few clients of a large federation builds only those. Other
    sources build the full partitioning once per process and config: every partitioner
    must see the whole dataset to give each client its share.
    """
    if not 0 <= partition_id < num_clients:
        raise DataError(
            f"partition_id: {partition_id} is outside 0..{num_clients - 1} "
            f"(federation.num_clients={num_clients})"
        )
    if cfg.source == "synthetic":
        cfg.check("data")
        return synthetic_client(cfg, partition_id)
    return _cached_texts(config_key(cfg), num_clients).clients[partition_id]


def central_test_texts(cfg: DataConfig, *, num_clients: int) -> tuple[str, ...]:
    """The server's held-out texts, without building every client for synthetic data."""
    if cfg.source == "synthetic":
        cfg.check("data")
        return synthetic_central_test(cfg, num_clients=num_clients)
    return _cached_texts(config_key(cfg), num_clients).central_test


def config_key(cfg: DataConfig) -> ConfigKey:
    """A hashable, order-stable key from the config's fields (DataConfig is mutable)."""
    return tuple((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg))


@functools.lru_cache(maxsize=4)
def _cached_texts(key: ConfigKey, num_clients: int) -> FederatedTexts:
    return build_federated_texts(DataConfig(**dict(key)), num_clients=num_clients)
