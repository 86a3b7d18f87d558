"""Per-client LoRA ranks (``peft.ranks``): parse the spec, decide each client's rank.

Two forms, comma-separated entries of one kind:

- a distribution, ``"30% r=4, 50% r=8, 20% r=16"`` (shares sum to 100%): the server
  sorts the node ids it sees and gives the first 30% rank 4, the next 50% rank 8, ...
  (largest remainder, so counts are exact and every run on the same nodes agrees);
- partition ids, ``"0-2 r=4, 3 r=8, * r=16"``: by the client's partition id (``*``:
  every other one). The server learns a node's partition id from its replies (the
  ``partition-id`` metric); a node it has not heard from yet gets the smallest rank.
- device tiers, ``"tier=small r=4, tier=large r=16, * r=8"``: by the ``tier`` in the
  node's config (``flower-supernode --node-config "tier='small'"``, or the agent's
  ``--tier small``). The node's ClientApp reports its tier with every reply as the
  ``tier-index`` metric (its position among the spec's tiers, -1 when it has none or
  one the spec does not name: ``*``'s rank, else the smallest), which the server
  learns like a partition id.

"" means everyone at ``peft.r``. Every rank must be <= ``peft.r``: the client model is
built at ``peft.r`` and a client of rank r trains the first r components, zero-padded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_SHARE = re.compile(r"^(\d+(?:\.\d+)?)\s*%\s*r\s*=\s*(\d+)$")
_PARTITION = re.compile(r"^(\*|\d+(?:\s*-\s*\d+)?)\s+r\s*=\s*(\d+)$")
_TIER = re.compile(r"^tier\s*=\s*([A-Za-z0-9_.-]+)\s+r\s*=\s*(\d+)$")
TIER_NODE_CONFIG = "tier"  # the node config key naming a device's tier
TIER_INDEX_KEY = "tier-index"  # the reply metric that reports it


class RankSpecError(ValueError):
    """``peft.ranks`` cannot be parsed; the message says which entry."""


@dataclass(frozen=True)
class RankSpec:
    shares: tuple[tuple[float, int], ...] = ()  # (fraction, rank)
    ranges: tuple[tuple[int, int, int], ...] = ()  # (first, last, rank); -1, -1 = '*'
    tiers: tuple[tuple[str, int], ...] = ()  # (tier name, rank); a '*' default is in ranges

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({r for _, r in self.shares} | {r for *_, r in self.ranges}
                            | {r for _, r in self.tiers}))

    @property
    def by_partition(self) -> bool:
        return bool(self.ranges) and not self.tiers

    @property
    def by_tier(self) -> bool:
        return bool(self.tiers)


def parse_ranks(spec: str) -> RankSpec:
    """``peft.ranks`` -> RankSpec; raises RankSpecError naming the bad entry."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        return RankSpec()
    shares: list[tuple[float, int]] = []
    ranges: list[tuple[int, int, int]] = []
    tiers: list[tuple[str, int]] = []
    for entry in entries:
        if m := _SHARE.match(entry):
            shares.append((float(m.group(1)) / 100, int(m.group(2))))
        elif m := _TIER.match(entry):
            if m.group(1) in {t for t, _ in tiers}:
                raise RankSpecError(f"entry {entry!r}: tier {m.group(1)!r} is named twice")
            tiers.append((m.group(1), int(m.group(2))))
        elif m := _PARTITION.match(entry):
            lo, _, hi = m.group(1).partition("-")
            first, last = (-1, -1) if lo == "*" else (int(lo), int(hi or lo))
            if first > last:
                raise RankSpecError(f"entry {entry!r}: range is empty")
            ranges.append((first, last, int(m.group(2))))
        else:
            raise RankSpecError(f"entry {entry!r}: expected 'P% r=R', 'FIRST-LAST r=R', "
                                "'tier=NAME r=R' or '* r=R'")
    if shares and (ranges or tiers):
        raise RankSpecError("mixes shares ('P% r=R') with partition ids or tiers; use one kind")
    if tiers and any(first != -1 for first, *_ in ranges):
        raise RankSpecError("mixes tiers ('tier=NAME r=R') and partition ids ('0-2 r=R'); "
                            "use one kind ('* r=R' is the default of either)")
    if any(r < 1 for *_, r in shares + ranges + tiers):
        raise RankSpecError("every rank must be >= 1")
    if shares and not math.isclose(sum(f for f, _ in shares), 1.0, abs_tol=1e-9):
        raise RankSpecError(f"shares sum to {sum(f for f, _ in shares) * 100:g}%, not 100%")
    return RankSpec(tuple(shares), tuple(ranges), tuple(tiers))


def ranks_by_share(node_ids: Sequence[int], shares: Sequence[tuple[float, int]]) -> dict[int, int]:
    """Sorted node ids split by share (largest remainder: counts sum to the population)."""
    nodes = sorted(node_ids)
    exact = [f * len(nodes) for f, _ in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[:len(nodes) - sum(counts)]:
        counts[i] += 1
    out, start = {}, 0
    for count, (_, rank) in zip(counts, shares):
        out.update({n: rank for n in nodes[start:start + count]})
        start += count
    return out


def rank_for_partition(partition_id: int | None, spec: RankSpec) -> int:
    """The rank of a partition id (None: not known yet -> the smallest rank)."""
    if partition_id is None:
        return min(spec.ranks)
    default = None
    for first, last, rank in spec.ranges:
        if first == -1:
            default = rank
        elif first <= partition_id <= last:
            return rank
    return default if default is not None else min(spec.ranks)


def tier_index(tier: object, spec: RankSpec) -> int:
    """A node's ``tier`` (node config value, may be absent) -> its position among the
    spec's tiers, or -1 (no tier, or one the spec does not name)."""
    names = [t for t, _ in spec.tiers]
    return names.index(tier) if isinstance(tier, str) and tier in names else -1


def rank_for_tier(index: int | None, spec: RankSpec) -> int:
    """The rank of a reported tier index (None: not heard from yet -> the smallest rank;
    -1: no named tier -> '*', else the smallest)."""
    if index is None:
        return min(spec.ranks)
    if 0 <= index < len(spec.tiers):
        return spec.tiers[index][1]
    default = [rank for first, _, rank in spec.ranges if first == -1]
    return default[0] if default else min(spec.ranks)


def assign_ranks(spec: RankSpec, node_ids: Sequence[int], *, default_rank: int,
                 partitions: Mapping[int, int] | None = None,
                 tiers: Mapping[int, int] | None = None) -> dict[int, int]:
    """Rank of each node: by share over ``node_ids``, by its reported tier index, or by
    its known partition id."""
    if spec.shares:
        return ranks_by_share(node_ids, spec.shares)
    if spec.tiers:
        tiers = tiers or {}
        return {n: rank_for_tier(tiers.get(n), spec) for n in node_ids}
    if spec.ranges:
        partitions = partitions or {}
        return {n: rank_for_partition(partitions.get(n), spec) for n in node_ids}
    return {n: default_rank for n in node_ids}


def tier_metrics(ranks: str, node_config: Mapping[str, object]) -> dict[str, int]:
    """What a ClientApp reports of its tier: ``{"tier-index": i}`` when ``peft.ranks``
    assigns ranks by tier, else nothing."""
    spec = parse_ranks(ranks)
    return {TIER_INDEX_KEY: tier_index(node_config.get(TIER_NODE_CONFIG), spec)} if spec.by_tier else {}
