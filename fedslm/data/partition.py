"""Split one text ``Dataset`` across clients with flwr-datasets' partitioners.

``iid`` shuffles with ``data.seed`` and cuts contiguous equal shards (Flower's
``IidPartitioner`` shards without shuffling, so a directory of files would otherwise
give each client whole files); ``dirichlet`` draws per-key client proportions with
``data.dirichlet_alpha``; ``natural`` gives each value of ``data.partition_key`` its
own client, largest groups first. Each client's records are then split into train and
test by ``data.test_fraction`` after a shuffle seeded by (``data.seed``, client index).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from collections.abc import Hashable, Sequence

import datasets
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

from fedslm.config import DataConfig
from fedslm.data.core import ClientSplit, DataError, check_client_split, split_train_test

MIN_RECORDS = 2  # one train and one test text
EMPTY_HINT = "use fewer clients (federation.num_clients) or more data per client"


def partition_texts(
    dataset: datasets.Dataset, cfg: DataConfig, *, num_clients: int, default_key: str = ""
) -> tuple[tuple[ClientSplit, ...], tuple[str, ...]]:
    """Every record of ``dataset`` goes to at most one client's train or test split.

    Returns the splits and notes on what was left out: natural partitioning keeps only
    the ``num_clients`` largest groups, and the run's output says how much it dropped.
    ``default_key`` stands in for an empty ``data.partition_key`` (classify: the label).
    """
    if not cfg.partition_key and default_key:
        cfg = dataclasses.replace(cfg, partition_key=default_key)
    parts = partition_dataset(dataset, cfg, num_clients=num_clients)
    kept = sum(len(p) for p in parts)
    notes: tuple[str, ...] = ()
    if kept < len(dataset):
        groups = len(set(dataset[cfg.partition_key]))
        notes = (f"data: natural partitioning by {cfg.partition_key!r} keeps the {num_clients} "
                 f"largest of {groups} groups: {kept} of {len(dataset)} records, "
                 f"{len(dataset) - kept} dropped (raise federation.num_clients to keep them)",)
    splits = tuple(
        check_client_split(
            i,
            split_train_test(part["text"], cfg.test_fraction, seed=f"fedslm-split:{cfg.seed}:{i}"),
            hint=EMPTY_HINT,
        )
        for i, part in enumerate(parts)
    )
    return splits, notes


def partition_dataset(
    dataset: datasets.Dataset, cfg: DataConfig, *, num_clients: int
) -> list[datasets.Dataset]:
    """One ``Dataset`` per client (index = partition id) by ``data.partitioner``."""
    if cfg.partitioner == "iid":
        if num_clients > len(dataset):
            raise DataError(
                f"federation.num_clients: {num_clients} clients but only {len(dataset)} texts"
            )
        partitioner = IidPartitioner(num_partitions=num_clients)
        partitioner.dataset = dataset.shuffle(seed=cfg.seed)
        return [partitioner.load_partition(i) for i in range(num_clients)]
    keys = key_column(dataset, cfg.partition_key)
    if cfg.partitioner == "dirichlet":
        return _dirichlet(dataset, cfg, num_clients)
    if cfg.partitioner == "natural":
        return natural_partitions(dataset, cfg.partition_key, largest_keys(keys, num_clients))
    raise DataError(f"data.partitioner: unknown partitioner {cfg.partitioner!r}")


def key_column(dataset: datasets.Dataset, key: str) -> list[Hashable]:
    """The partition key values, rejecting a missing column or missing values."""
    if key not in dataset.column_names:
        raise DataError(
            f"data.partition_key: no column {key!r} (columns: {', '.join(dataset.column_names)})"
        )
    values = list(dataset[key])
    missing = sum(v is None for v in values)
    if missing:
        raise DataError(f"data.partition_key: {missing} of {len(values)} records have no {key!r}")
    return values


def largest_keys(keys: Sequence[Hashable], num_clients: int) -> list[Hashable]:
    """The ``num_clients`` most frequent keys, most records first, ties by key."""
    counts = Counter(keys)
    if num_clients > len(counts):
        raise DataError(
            f"federation.num_clients: {num_clients} clients but only {len(counts)} distinct "
            f"values of the natural partition key"
        )
    return sorted(counts, key=lambda k: (-counts[k], k))[:num_clients]


def natural_partitions(
    dataset: datasets.Dataset, key: str, order: Sequence[Hashable]
) -> list[datasets.Dataset]:
    """One partition per key in ``order`` (client i gets ``order[i]``); other keys dropped."""
    wanted = set(order)
    keep = [i for i, v in enumerate(dataset[key]) if v in wanted]
    partitioner = NaturalIdPartitioner(partition_by=key)
    partitioner.dataset = dataset.select(keep) if len(keep) < len(dataset) else dataset
    _ = partitioner.num_partitions  # builds partition_id_to_natural_id (sorted natural ids)
    partition_of = {nid: pid for pid, nid in partitioner.partition_id_to_natural_id.items()}
    return [partitioner.load_partition(partition_of[k]) for k in order]


def _dirichlet(
    dataset: datasets.Dataset, cfg: DataConfig, num_clients: int
) -> list[datasets.Dataset]:
    if num_clients * MIN_RECORDS > len(dataset):
        raise DataError(
            f"federation.num_clients: {num_clients} clients need at least "
            f"{num_clients * MIN_RECORDS} texts, got {len(dataset)}"
        )
    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by=cfg.partition_key,
        alpha=cfg.dirichlet_alpha,
        min_partition_size=MIN_RECORDS,
        self_balancing=False,
        shuffle=True,
        seed=cfg.seed,
    )
    partitioner.dataset = dataset
    try:
        with warnings.catch_warnings():  # it warns on every resample; the failure is ours to report
            warnings.simplefilter("ignore")
            return [partitioner.load_partition(i) for i in range(num_clients)]
    except ValueError as err:
        raise DataError(
            f"data.dirichlet_alpha: no split with >= {MIN_RECORDS} texts per client after "
            f"10 draws at alpha={cfg.dirichlet_alpha}; raise it or use fewer clients "
            f"(federation.num_clients)"
        ) from err
