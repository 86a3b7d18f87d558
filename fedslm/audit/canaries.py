"""Canaries: secret sequences planted in chosen clients' training texts, and their rivals.

A canary is ``audit.template`` with ``{secret}`` replaced by ``audit.secret_length``
random digits (space-separated, one token-ish unit each). Every repetition count ``r``
in ``audit.repetitions`` gets ``audit.canaries`` canaries per canary client, each added
``r`` times to that client's *train* texts at seeded positions; test texts never hold
one. The candidates an exposure is ranked against are other secrets of the same
template, none of them a canary. Everything is drawn from string-seeded
``random.Random`` streams, so the clients (which insert) and the audit (which ranks)
agree without exchanging anything.

``with_canaries`` is the one hook into the data path (``fedslm.client.task.client_texts``); it
changes nothing unless ``privacy.audit`` is on and the client is a canary client.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass

from fedslm.config import AuditConfig, ExperimentConfig
from fedslm.data.core import ClientSplit


@dataclass(frozen=True)
class Canary:
    partition_id: int
    repetitions: int
    secret: str
    text: str


def _rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"fedslm-audit:{seed}:{stream}")


def draw_secret(rng: random.Random, length: int) -> str:
    return " ".join(str(rng.randrange(10)) for _ in range(length))


def canary_text(template: str, secret: str) -> str:
    return template.replace("{secret}", secret)


def make_canaries(cfg: AuditConfig) -> tuple[Canary, ...]:
    """Every canary of the audit, all clients: distinct secrets, in (client, count) order."""
    rng, seen = _rng(cfg.seed, "canaries"), set()
    out: list[Canary] = []
    for pid in cfg.canary_clients:
        for reps in cfg.repetitions:
            for _ in range(cfg.canaries):
                secret = draw_secret(rng, cfg.secret_length)
                while secret in seen:
                    secret = draw_secret(rng, cfg.secret_length)
                seen.add(secret)
                out.append(Canary(pid, reps, secret, canary_text(cfg.template, secret)))
    return tuple(out)


def candidate_texts(cfg: AuditConfig) -> tuple[str, ...]:
    """``audit.candidates`` distinct texts of the template whose secrets are no canary's."""
    taken = {c.secret for c in make_canaries(cfg)}
    rng, out = _rng(cfg.seed, "candidates"), []
    while len(out) < cfg.candidates:
        secret = draw_secret(rng, cfg.secret_length)
        if secret not in taken:
            taken.add(secret)
            out.append(canary_text(cfg.template, secret))
    return tuple(out)


def insert_canaries(train: Sequence[str], canaries: Sequence[Canary], *,
                    seed: int | str) -> tuple[str, ...]:
    """``train`` with each canary's text added ``repetitions`` times at seeded positions.

    The original texts keep their relative order; copies of one canary are spread out
    (each copy goes to its own random slot), as repeated text in real data would be.
    """
    copies = [c.text for c in canaries for _ in range(c.repetitions)]
    rng = random.Random(f"fedslm-audit-insert:{seed}")
    out = list(train)
    for text in copies:
        out.insert(rng.randrange(len(out) + 1), text)
    return tuple(out)


def client_canaries(cfg: ExperimentConfig, partition_id: int) -> tuple[Canary, ...]:
    if not cfg.privacy.audit or partition_id not in cfg.audit.canary_clients:
        return ()
    return tuple(c for c in make_canaries(cfg.audit) if c.partition_id == partition_id)


def with_canaries(cfg: ExperimentConfig, partition_id: int, split: ClientSplit) -> ClientSplit:
    """This client's split with its canaries in the train texts (unchanged if it has none)."""
    canaries = client_canaries(cfg, partition_id)
    if not canaries:
        return split
    train = insert_canaries(split.train, canaries, seed=f"{cfg.audit.seed}:{partition_id}")
    return dataclasses.replace(split, train=train)
