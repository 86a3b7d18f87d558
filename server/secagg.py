"""The server's side of SecAgg+: a state machine over the four stages (no Flower).

Each ``on_*`` method takes the replies of one stage (by node id) and returns the
requests of the next, or raises ``Abandoned`` when the round can no longer be unmasked;
``fedslm.server.secagg_round`` turns them into Message-API round trips. What the server holds
is public keys, ciphertexts it cannot read, masked vectors and, at the end, the
reconstructed self-mask seeds of survivors and masking keys of dropped clients: enough
for the sum, never for one client's update (Bell et al. 2020, Thm 3.6; with the
threshold above half the neighbourhood also against a server that lies about dropouts).

Screening moves here from the plain path: a masked vector is checked for its length,
dtype and ring range (a reply that fails is treated as a dropout and recovered); a
reconstructed secret is checked against the owner's commitment (self-mask seed) or
public key (masking key), so a forged share is found and its holder named; a sum
outside what honest inputs can add to abandons the round.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedslm.config import SecureAggregationConfig
from fedslm.secagg import crypto, ring
from fedslm.secagg.protocol import Graph, threshold

MAX_COMBINATIONS = 256  # subsets of shares tried per secret before giving up


class Abandoned(RuntimeError):
    """The round cannot be unmasked; the message says why. The global adapter stays."""


@dataclass
class SecAggRound:
    """One round of the protocol on the server, among the ``sampled`` node ids."""

    sa: SecureAggregationConfig
    server_round: int
    sampled: list[int]
    size: int                      # values in one update vector
    rng: random.Random = field(default_factory=random.SystemRandom)
    keys: dict[int, tuple[bytes, bytes, bytes]] = field(default_factory=dict)  # pk_enc, pk_mask, commit
    graph: Graph | None = None
    shared: set[int] = field(default_factory=set)                # U2
    inbox: dict[int, dict[int, bytes]] = field(default_factory=dict)  # dst -> src -> ciphertext
    masked: dict[int, np.ndarray] = field(default_factory=dict)  # U3
    rejected: dict[int, str] = field(default_factory=dict)       # node -> why (treated as dropped)
    liars: dict[int, str] = field(default_factory=dict)          # share holders caught lying
    complaints: dict[int, set[int]] = field(default_factory=dict)  # sender -> who could not decrypt

    @property
    def threshold(self) -> int:
        return threshold(self.sa, len(self.sampled))

    def _need(self, have: int, stage: str) -> None:
        if have < self.threshold:
            raise Abandoned(f"{stage}: {have} client(s) left, threshold {self.threshold}")

    # stage 1 -> 2
    def on_keys(self, replies: dict[int, tuple[bytes, bytes, bytes]]) -> dict[int, dict[int, tuple[bytes, bytes]]]:
        """Keep well-formed, distinct key advertisements; the neighbours (and their public
        keys) each of them must share with."""
        seen: set[bytes] = set()
        for node in sorted(replies):
            pk_enc, pk_mask, commitment = (bytes(v) for v in replies[node])
            try:
                crypto.load_public(pk_enc), crypto.load_public(pk_mask)
            except ValueError:
                self.rejected[node] = "public key is not a P-256 point"
                continue
            if len(commitment) != 32:
                self.rejected[node] = "commitment is not 32 bytes"
                continue
            if {pk_enc, pk_mask} & seen or pk_enc == pk_mask:
                self.rejected[node] = "public key reused (replayed or copied)"
                continue
            seen |= {pk_enc, pk_mask}
            self.keys[node] = (pk_enc, pk_mask, commitment)
        self._need(len(self.keys), "key advertisement")
        self.graph = Graph.build(sorted(self.keys), self.sa.num_neighbours, self.rng)
        return {node: {peer: self.keys[peer][:2] for peer in self.graph.neighbours[node]}
                for node in self.keys}

    # stage 2 -> 3
    def on_shares(self, replies: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Keep clients that sent one ciphertext to each neighbour; route the ciphertexts."""
        assert self.graph is not None
        for node, cts in replies.items():
            if node not in self.keys:
                continue
            if set(cts) != set(self.graph.neighbours[node]):
                self.rejected[node] = "shares not addressed to exactly its neighbours"
                continue
            self.shared.add(node)
        self._need(len(self.shared), "key sharing")
        self.inbox = {dst: {} for dst in self.shared}
        for src in self.shared:
            for dst, ct in replies[src].items():
                if dst in self.shared:
                    self.inbox[dst][src] = bytes(ct)
        return self.inbox

    # stage 3 -> 4
    def on_masked(self, replies: dict[int, np.ndarray], undecryptable: dict[int, list[int]] | None = None
                  ) -> dict[int, tuple[list[int], list[int]]]:
        """Keep masked vectors of the right length in the ring; each survivor is told
        which of its neighbours survived and which dropped. ``undecryptable``: the
        senders each client could not decrypt (named if their secret cannot be rebuilt)."""
        for node, senders in (undecryptable or {}).items():
            for sender in senders:
                self.complaints.setdefault(int(sender), set()).add(node)
        limit = 1 << self.sa.modulus_bits
        for node, vector in replies.items():
            if node not in self.shared:
                continue
            vector = np.asarray(vector)
            if vector.shape != (self.size,):
                self.rejected[node] = f"masked vector has shape {vector.shape}, expected ({self.size},)"
            elif vector.dtype.kind != "u":
                self.rejected[node] = f"masked vector has dtype {vector.dtype}, expected unsigned"
            elif vector.size and int(vector.max()) >= limit:
                self.rejected[node] = f"masked vector has values outside Z_2^{self.sa.modulus_bits}"
            else:
                self.masked[node] = vector.astype(np.uint64)
        self._need(len(self.masked), "masked input collection")
        assert self.graph is not None
        plan = {}
        for node in self.masked:
            peers = set(self.inbox[node])  # the neighbours it masked with
            plan[node] = (sorted((peers & set(self.masked)) | {node}), sorted(peers - set(self.masked)))
        return plan

    @property
    def dropped(self) -> list[int]:
        """Clients that shared keys but whose masked input is not in the sum."""
        return sorted(self.shared - set(self.masked))

    # stage 4 -> sum
    def on_unmask(self, replies: dict[int, tuple[dict[int, bytes], dict[int, bytes]]]) -> np.ndarray:
        """The sum of the survivors' quantized inputs, in Z_(2^modulus_bits)."""
        bits = self.sa.modulus_bits
        total = np.zeros(self.size, dtype=np.uint64)
        for vector in self.masked.values():
            total = ring.add_mod(total, vector, bits)
        for owner in sorted(self.masked):
            shares = {h: b[owner] for h, (b, _) in replies.items() if owner in b}
            commitment = self.keys[owner][2]
            seed = self._rebuild(owner, shares, lambda s, c=commitment: crypto.commit(s) == c)
            total = ring.sub_mod(total, crypto.expand_mask(seed, self.size, bits), bits)
        assert self.graph is not None
        for gone in self.dropped:
            partners = [p for p in self.graph.neighbours[gone] if p in self.masked and gone in self.inbox[p]]
            if not partners:
                continue
            shares = {h: k[gone] for h, (_, k) in replies.items() if gone in k}
            pk_mask = self.keys[gone][1]
            scalar = self._rebuild(gone, shares, lambda s, pk=pk_mask: _is_key_of(s, pk))
            key = crypto.private_from_scalar(scalar)
            for partner in partners:
                pairwise = crypto.expand_mask(crypto.mask_seed(key, self.keys[partner][1]), self.size, bits)
                # the partner added the mask towards a higher id and subtracted it towards a lower
                total = (ring.sub_mod if partner < gone else ring.add_mod)(total, pairwise, bits)
        if not ring.in_sum_range(total, len(self.masked), quantization_bits=self.sa.quantization_bits):
            raise Abandoned("unmasked sum is outside what honest inputs can add to: a client "
                            "sent values outside the quantization range")
        return total

    def _rebuild(self, owner: int, shares: dict[int, bytes], valid: Callable[[bytes], bool]) -> bytes:
        """The secret of ``owner`` from ``threshold`` of ``shares`` (holder -> share) that
        reconstruct a value ``valid`` accepts. When the first subset fails, the holders
        whose share disagrees with the secret found are named liars (and not asked again)."""
        t = self.threshold
        honest = {h: s for h, s in shares.items() if h not in self.liars}
        if len(honest) < t:
            blame = (f"; {len(self.complaints[owner])} neighbour(s) could not decrypt its shares"
                     if owner in self.complaints else "")
            raise Abandoned(f"unmasking: {len(honest)} share(s) of client {owner}'s secret, "
                            f"threshold {t}{blame}")
        holders = sorted(honest)
        for tries, subset in enumerate(itertools.islice(itertools.combinations(holders, t), MAX_COMBINATIONS)):
            secret = _combine([honest[h] for h in subset])
            if secret is not None and valid(secret):
                if tries:  # a forged share got in the way: name whoever disagrees
                    base = [honest[h] for h in subset[:t - 1]]
                    for h in holders:
                        if h not in subset and _combine([*base, honest[h]]) != secret:
                            self.liars[h] = f"sent a wrong share of client {owner}'s secret"
                return secret
        raise Abandoned(f"unmasking: no {t} shares of client {owner}'s secret agree with its commitment")


def _combine(shares: list[bytes]) -> bytes | None:
    try:
        return crypto.combine_shares([bytes(s) for s in shares])
    except (ValueError, IndexError):
        return None


def _is_key_of(scalar: bytes, pk_mask: bytes) -> bool:
    try:
        return len(scalar) == crypto.SCALAR_BYTES and crypto.public_bytes(
            crypto.private_from_scalar(scalar)) == pk_mask
    except ValueError:
        return False


def mean_update(total: np.ndarray, count: int, *, sa: SecureAggregationConfig,
                weight_total: float | None = None) -> np.ndarray:
    """The mean of the ``count`` updates summed into ``total``: equal-weight, or, when
    each was scaled by its weight before quantizing, divided by their ``weight_total``."""
    return ring.dequantize_sum(total, count, clipping_range=sa.clipping_range,
                               quantization_bits=sa.quantization_bits) / (weight_total or count)
