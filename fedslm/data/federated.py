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
from fedslm.data.synthetic import build_synthetic, synthetic_central_test, synthetic_client, synthetic_root

ConfigKey = tuple[tuple[str, object], ...]


def build_federated_texts(cfg: DataConfig, *, num_clients: int, task: str = "causal_lm") -> FederatedTexts:
    """All clients' train/test texts (index = partition id), public and central test texts.

    ``central_test`` is separately drawn for ``synthetic``; for other sources it is a
    round-robin sample of up to 64 client *test* texts (never trained on, but also used
    by the clients' own evaluation). ``data.partitioner`` applies to text_files and hf;
    synthetic clients are generated and shakespeare clients are speakers. Records are
    ``task``'s (``fedslm.tasks``): plain texts for causal_lm, JSON objects otherwise.
    """
    cfg.check("data")
    if num_clients < 1:
        raise DataError(f"federation.num_clients: must be >= 1, got {num_clients}")
    if cfg.source == "synthetic":
        return build_synthetic(cfg, num_clients=num_clients, task=task)
    if cfg.source == "shakespeare" and task != "causal_lm":
        raise DataError(f"data.source: shakespeare is plain text; task.name={task} needs records "
                        "with structure")
    if cfg.source == "shakespeare":
        from fedslm.data.shakespeare import build_shakespeare

        return build_shakespeare(cfg, num_clients=num_clients)
    from fedslm.data.partition import partition_texts
    from fedslm.data.sources import load_source

    clients, notes = partition_texts(load_source(cfg, task), cfg, num_clients=num_clients,
                                     default_key=cfg.label_key if task == "classify" else "")
    return FederatedTexts(clients=clients, public=(), central_test=sample_central_test(clients),
                          notes=notes)


def load_client_split(cfg: DataConfig, *, num_clients: int, partition_id: int,
                      task: str = "causal_lm") -> ClientSplit:
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
        return synthetic_client(cfg, partition_id, task)
    return _cached_texts(config_key(cfg), num_clients, task).clients[partition_id]


def central_test_texts(cfg: DataConfig, *, num_clients: int, task: str = "causal_lm") -> tuple[str, ...]:
    """The server's held-out records, without building every client for synthetic data."""
    if cfg.source == "synthetic":
        cfg.check("data")
        return synthetic_central_test(cfg, num_clients=num_clients, task=task)
    return _cached_texts(config_key(cfg), num_clients, task).central_test


def root_texts(cfg: DataConfig, *, num_clients: int, task: str = "causal_lm", root_docs: int,
               root_data: str = "") -> tuple[str, ...]:
    """FLTrust's clean root records, which the server trains on (``strategy.root_data`` /
    ``strategy.root_docs``): the file ``root_data`` read with the task's loader (as
    ``data.source=text_files`` reads one), else ``root_docs`` synthetic records disjoint
    from every client and the central split (``synthetic_root``)."""
    if root_data:
        from fedslm.data.sources import load_text_files

        files = dataclasses.replace(cfg, source="text_files", path=root_data)
        try:
            records = tuple(load_text_files(files, task)["text"])
        except DataError as err:
            raise DataError(str(err).replace("data.path: ", "strategy.root_data: ", 1)) from None
        except OSError as err:
            raise DataError(f"strategy.root_data: cannot read {err.filename or root_data} "
                            f"({err.strerror})") from None
        if not records:
            raise DataError(f"strategy.root_data: {root_data} holds no records")
        return records
    if cfg.source != "synthetic" or root_docs < 1:
        raise DataError(f"strategy.root_data: no root data (data.source={cfg.source}, "
                        f"strategy.root_docs={root_docs}); name a file")
    cfg.check("data")
    return synthetic_root(cfg, num_clients=num_clients, num_docs=root_docs, task=task)


def data_notes(cfg: DataConfig, *, num_clients: int, task: str = "causal_lm") -> tuple[str, ...]:
    """What partitioning left out (e.g. natural groups beyond ``num_clients``), to report."""
    if cfg.source in ("synthetic", "shakespeare"):
        return ()
    return _cached_texts(config_key(cfg), num_clients, task).notes


def dataset_labels(cfg: DataConfig) -> tuple[str, ...]:
    """The classes of the whole dataset in index order (classify without label names)."""
    return _dataset_labels(config_key(cfg))


@functools.lru_cache(maxsize=4)
def _dataset_labels(key: ConfigKey) -> tuple[str, ...]:
    from fedslm.data.sources import load_source
    from fedslm.tasks.classify import label_mapping

    cfg = DataConfig(**{k: list(v) if isinstance(v, tuple) else v for k, v in key})
    dataset = load_source(cfg, "classify")
    mapping = label_mapping(dataset[cfg.label_key], cfg.label_names, where=cfg.path or cfg.hf_name)
    return tuple(str(v) for v in sorted(mapping, key=mapping.__getitem__))


def config_key(cfg: DataConfig) -> ConfigKey:
    """A hashable, order-stable key from the config's fields (DataConfig is mutable)."""
    return tuple((f.name, tuple(v) if isinstance(v := getattr(cfg, f.name), list) else v)
                 for f in dataclasses.fields(cfg))


@functools.lru_cache(maxsize=4)
def _cached_texts(key: ConfigKey, num_clients: int, task: str = "causal_lm") -> FederatedTexts:
    cfg = DataConfig(**{k: list(v) if isinstance(v, tuple) else v for k, v in key})
    return build_federated_texts(cfg, num_clients=num_clients, task=task)
