"""The client's side of SecAgg+, stage by stage, as plain functions (no Flower).

A client's round state (``ClientRound``) is its fresh entropy, the public keys of its
neighbours and the shares it holds for them; ``fedslm.client.secagg_handler`` keeps it in the
client's state dir for the length of one round and deletes it after the last stage, so
nothing a client keeps lets anyone rebuild a past round's masks.

What the server can no longer check under SecAgg is checked here before masking: the
update is finite, has the length of the adapter the server sent, is clipped (L2 to the
DP norm when there is one, per value to the quantization range always) and lies in the
ring. Crypto comes from ``fedslm.secagg.crypto``.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np
from cryptography.fernet import InvalidToken
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from fedslm.config import SecureAggregationConfig
from fedslm.secagg import crypto, ring


class ProtocolAbort(RuntimeError):
    """The server asked for something an honest client must refuse; the message says what."""


@dataclass
class ClientRound:
    """One client's state between the stages of one round."""

    server_round: int
    self_id: int
    entropy: bytes
    threshold: int = 0
    noise_std: float = 0.0  # per value, this client's share of the DP noise
    peers: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # id -> (pk_enc, pk_mask)
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)   # owner -> (b share, key share)
    masked_with: list[int] = field(default_factory=list)
    revealed: bool = False

    @property
    def secrets(self) -> crypto.Secrets:
        return crypto.Secrets.from_entropy(self.entropy)

    def to_json(self) -> str:
        data = asdict(self)
        data["entropy"] = self.entropy.hex()
        data["peers"] = {str(k): [a.hex(), b.hex()] for k, (a, b) in self.peers.items()}
        data["held"] = {str(k): [a.hex(), b.hex()] for k, (a, b) in self.held.items()}
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "ClientRound":
        data = json.loads(text)
        data["entropy"] = bytes.fromhex(data["entropy"])
        data["peers"] = {int(k): (bytes.fromhex(a), bytes.fromhex(b)) for k, (a, b) in data["peers"].items()}
        data["held"] = {int(k): (bytes.fromhex(a), bytes.fromhex(b)) for k, (a, b) in data["held"].items()}
        return cls(**data)


def advertise_keys(server_round: int, self_id: int, *, entropy: bytes | None = None
                   ) -> tuple[ClientRound, dict[str, bytes]]:
    """Stage 1: fresh secrets; the two public keys and the self-mask commitment to send."""
    state = ClientRound(server_round, self_id, os.urandom(crypto.SEED_BYTES) if entropy is None else entropy)
    s = state.secrets
    return state, {"pk-enc": crypto.public_bytes(s.encryption), "pk-mask": crypto.public_bytes(s.masking),
                   "commit": crypto.commit(s.self_seed)}


def share_keys(state: ClientRound, peers: dict[int, tuple[bytes, bytes]], *, threshold: int,
               expected_threshold: int) -> dict[int, bytes]:
    """Stage 2: Shamir-share the self-mask seed and the masking key among this client and
    its neighbours (``threshold`` to rebuild), one ciphertext per neighbour."""
    if threshold != expected_threshold:
        raise ProtocolAbort(f"server asked for threshold {threshold}, the config gives {expected_threshold}")
    if state.self_id in peers or not 2 <= threshold <= len(peers) + 1:
        raise ProtocolAbort(f"bad neighbourhood: {len(peers)} neighbours, threshold {threshold}")
    state.peers, state.threshold = dict(peers), threshold
    s = state.secrets
    owners = [state.self_id, *sorted(peers)]
    b_shares = crypto.create_shares(s.self_seed, threshold, len(owners))
    key_shares = crypto.create_shares(crypto.scalar_bytes(s.masking), threshold, len(owners))
    state.held = {state.self_id: (b_shares[0], key_shares[0])}
    out = {}
    for peer, b_share, key_share in zip(owners[1:], b_shares[1:], key_shares[1:]):
        key = crypto.encryption_key(s.encryption, peers[peer][0])
        out[peer] = crypto.encrypt(key, share_keys_plaintext_concat(state.self_id, peer, b_share, key_share))
    return out


def receive_shares(state: ClientRound, ciphertexts: dict[int, bytes]) -> list[int]:
    """Stage 3, first half: keep the shares neighbours sent; the senders whose ciphertext
    does not decrypt or is not addressed from them to this client (forged, replayed from
    another round) are returned and hold no share here. Masks are agreed with every
    sender named, decryptable or not: each of them masks with this client."""
    bad = []
    for src, token in ciphertexts.items():
        if src not in state.peers:
            raise ProtocolAbort(f"ciphertext from {src}, who is not a neighbour")
        try:
            plain = crypto.decrypt(crypto.encryption_key(state.secrets.encryption, state.peers[src][0]),
                                   bytes(token))
            got_src, got_dst, b_share, key_share = share_keys_plaintext_separate(plain)
        except (InvalidToken, ValueError):
            bad.append(src)
            continue
        if (got_src, got_dst) != (src, state.self_id):
            bad.append(src)
            continue
        state.held[src] = (b_share, key_share)
    state.masked_with = sorted(ciphertexts)
    return sorted(bad)


def prepare_update(update: list[np.ndarray], *, sa: SecureAggregationConfig, clip_norm: float,
                   noise_std: float, rng: np.random.Generator, scale: float = 1.0) -> tuple[np.ndarray, bool]:
    """The update as ring values: finite, L2-clipped to ``clip_norm`` (0: not), plus
    Gaussian noise of ``noise_std`` per value, clipped per value to the quantization
    range, times ``scale`` (a weighted round's w/W, in (0, 1]), quantized. Returns
    (values, clipped)."""
    vector = ring.flatten(update)
    if not np.isfinite(vector).all():
        raise ValueError("update has non-finite values; not sending it")
    clipped = False
    if clip_norm > 0:
        vector, clipped = ring.clip_l2(vector, clip_norm)
    if noise_std > 0:
        vector = vector + rng.normal(0.0, noise_std, vector.shape)
    if scale != 1.0:
        vector = np.clip(vector, -sa.clipping_range, sa.clipping_range) * scale
    return ring.quantize(vector, clipping_range=sa.clipping_range,
                         quantization_bits=sa.quantization_bits, rng=rng), clipped


def weight_scale(weight: object, weight_max: object) -> float:
    """A weighted round's factor w/W for this client's update: its capped weight over
    the round's largest, both from the server; anything but 0 < w <= W is refused."""
    if (isinstance(weight, int) and isinstance(weight_max, int) and not isinstance(weight, bool)
            and not isinstance(weight_max, bool) and 0 < weight <= weight_max):
        return weight / weight_max
    raise ProtocolAbort(f"server sent weight {weight!r} of {weight_max!r}; expected 0 < w <= W")


def mask(state: ClientRound, values: np.ndarray, *, modulus_bits: int) -> np.ndarray:
    """Stage 3, second half: values + self mask + pairwise masks (+ towards higher ids,
    - towards lower) in Z_(2^modulus_bits)."""
    s = state.secrets
    out = ring.add_mod(values, crypto.expand_mask(s.self_seed, values.size, modulus_bits), modulus_bits)
    for peer in state.masked_with:
        pairwise = crypto.expand_mask(crypto.mask_seed(s.masking, state.peers[peer][1]), values.size,
                                      modulus_bits)
        out = (ring.add_mod if state.self_id < peer else ring.sub_mod)(out, pairwise, modulus_bits)
    return out


def reveal(state: ClientRound, survivors: list[int], dropped: list[int]
           ) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """Stage 4: self-mask shares of the survivors, masking-key shares of the dropped.

    Never both for one client, never twice per round, and only when at least
    ``threshold`` of this neighbourhood survived: otherwise a lying server could
    rebuild a survivor's masking key and with it that survivor's update.
    """
    if state.revealed:
        raise ProtocolAbort("shares were already revealed this round")
    survivors, dropped = set(survivors), set(dropped)
    if survivors & dropped:
        raise ProtocolAbort(f"clients {sorted(survivors & dropped)[:3]} named both survivor and dropped")
    if state.self_id not in survivors:
        raise ProtocolAbort("this client sent its masked input but is not named a survivor")
    known = set(state.masked_with) | {state.self_id}
    if not (survivors | dropped) <= known:
        raise ProtocolAbort("unmasking names clients this client never masked with")
    if len(survivors) < state.threshold:
        raise ProtocolAbort(f"only {len(survivors)} survivors, threshold {state.threshold}")
    state.revealed = True
    b = {owner: state.held[owner][0] for owner in sorted(survivors) if owner in state.held}
    keys = {owner: state.held[owner][1] for owner in sorted(dropped) if owner in state.held}
    return b, keys


def noise_std(*, noise_multiplier: float, clipping_norm: float, threshold: int) -> float:
    """Per-client stddev so that any ``threshold`` or more clients' noise sums to at least
    stddev z*C, DP-FedAvg's noise on the sum."""
    return noise_multiplier * clipping_norm / math.sqrt(threshold)


def simulated_dropout(fraction: float, server_round: int, client: int) -> bool:
    """Benchmarks/tests: whether ``client`` plays dropped in this round (a fixed hash)."""
    return fraction > 0 and zlib.crc32(f"{server_round}:{client}".encode()) / 2**32 < fraction
