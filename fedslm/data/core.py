"""Types every data source returns, and the one train/test split rule they share.

Kept free of ``datasets``/``flwr_datasets`` imports so that the synthetic path (the
default, and what the builtin tokenizer is trained on) imports in milliseconds.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

CENTRAL_TEST_MAX = 64


class DataError(ValueError):
    """Client data cannot be built; the one-line message names the config key or file."""


@dataclass(frozen=True)
class ClientSplit:
    """One client's texts: ``train`` for local fitting, ``test`` for local evaluation."""

    train: tuple[str, ...]
    test: tuple[str, ...]


@dataclass(frozen=True)
class FederatedTexts:
    """All clients' texts (index = partition id) plus what the server needs.

    ``public`` is the synthetic public split used to pre-train the builtin model (``()``
    for other sources); ``central_test`` feeds the server's central evaluation.
    """

    clients: tuple[ClientSplit, ...]
    public: tuple[str, ...]
    central_test: tuple[str, ...]
    notes: tuple[str, ...] = ()  # what partitioning left out, said in the run's output


def num_test(n: int, test_fraction: float) -> int:
    """Test share of ``n`` items: round(n * fraction), at least 1 and at most n - 1."""
    return min(max(1, round(n * test_fraction)), max(n - 1, 0))


def split_train_test(
    texts: Sequence[str], test_fraction: float, *, seed: int | str | None
) -> ClientSplit:
    """Split one client's texts after a seeded shuffle; ``seed=None`` keeps their order."""
    items = list(texts)
    if seed is not None:
        random.Random(seed).shuffle(items)
    cut = len(items) - num_test(len(items), test_fraction)
    return ClientSplit(train=tuple(items[:cut]), test=tuple(items[cut:]))


def check_client_split(index: int, split: ClientSplit, *, hint: str) -> ClientSplit:
    """Reject a client that cannot both train and evaluate, naming it and what to change."""
    for part in ("train", "test"):
        if not getattr(split, part):
            raise DataError(
                f"federation.num_clients: client {index} has no {part} texts "
                f"({len(split.train) + len(split.test)} in total); {hint}"
            )
    return split


def sample_central_test(
    clients: Sequence[ClientSplit], limit: int = CENTRAL_TEST_MAX
) -> tuple[str, ...]:
    """Round-robin over the clients' test texts (first of each, then second, ...) up to ``limit``.

    Used for sources with no separate held-out pool: the texts are client *test* texts,
    never trained on, and every client is represented before any is repeated.
    """
    out: list[str] = []
    depth = max((len(c.test) for c in clients), default=0)
    for j in range(depth):
        for client in clients:
            if j < len(client.test):
                out.append(client.test[j])
                if len(out) == limit:
                    return tuple(out)
    return tuple(out)
