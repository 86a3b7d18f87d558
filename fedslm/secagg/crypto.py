"""The primitives SecAgg+ needs, each from a kept library; nothing here is hand-rolled.

- key agreement: ECDH on NIST P-256 (``cryptography``) with Flower's HKDF-SHA256
  derivation (``flwr.common.secure_aggregation.crypto.symmetric_encryption``);
- pairwise encryption of shares: Fernet (AES-128-CBC + HMAC-SHA256) through Flower's
  ``encrypt``/``decrypt``, so a tampered or replayed ciphertext fails authentication;
- secret sharing: Flower's Shamir helpers (pycryptodome, GF(2^128) per 16-byte chunk);
- mask expansion: ChaCha20 keystream (``cryptography``) from a 32-byte seed. Flower's own
  ``pseudo_rand_gen`` is *not* used: it folds the seed into 32 bits for numpy's Mersenne
  Twister, so a mask could be found by trying 2^32 seeds;
- commitments: SHA-256 of the self-mask seed, published with the public keys, so the
  server can tell a correctly reconstructed seed from one built from a forged share.

A client's secrets come from OS entropy; tests may pass ``entropy`` to make every key,
seed and rounding draw of a client reproducible (``Secrets.from_entropy``).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)

CURVE = ec.SECP256R1()
SCALAR_BYTES = 32
SEED_BYTES = 32

__all__ = ["Secrets", "combine_shares", "commit", "create_shares", "decrypt", "derive",
           "encrypt", "encryption_key", "expand_mask", "load_public", "mask_seed",
           "private_from_scalar", "public_bytes", "scalar_bytes"]


def derive(entropy: bytes, label: str, length: int = SEED_BYTES) -> bytes:
    """HKDF-SHA256 of ``entropy`` for one purpose (``label``): independent sub-secrets."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                info=label.encode()).derive(entropy)


def private_from_scalar(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    """The P-256 private key whose secret scalar is ``scalar`` (big-endian, 32 bytes)."""
    return ec.derive_private_key(int.from_bytes(scalar, "big"), CURVE)


def _private_from_entropy(entropy: bytes, label: str) -> ec.EllipticCurvePrivateKey:
    # 48 bytes reduced mod the group order: a uniform scalar up to a 2^-128 bias.
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    return ec.derive_private_key(int.from_bytes(derive(entropy, label, 48), "big") % (order - 1) + 1,
                                 CURVE)


def scalar_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(SCALAR_BYTES, "big")


def public_bytes(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    """Compressed SEC1 point, 33 bytes."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)


def load_public(data: bytes) -> ec.EllipticCurvePublicKey:
    """A peer's public key; raises ValueError for bytes that are not a P-256 point."""
    return ec.EllipticCurvePublicKey.from_encoded_point(CURVE, bytes(data))


def commit(seed: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(seed)
    return digest.finalize()


def encryption_key(own: ec.EllipticCurvePrivateKey, peer: bytes) -> bytes:
    """Fernet key shared by two clients (ECDH + HKDF, Flower's derivation)."""
    return generate_shared_key(own, load_public(peer))


def mask_seed(own: ec.EllipticCurvePrivateKey, peer: bytes) -> bytes:
    """The pairwise mask seed two clients agree on (ECDH + HKDF, Flower's derivation)."""
    return base64.urlsafe_b64decode(generate_shared_key(own, load_public(peer)))


def expand_mask(seed: bytes, size: int, modulus_bits: int) -> np.ndarray:
    """``size`` uniform values in Z_(2^modulus_bits) (uint64) from the ChaCha20 keystream
    of ``seed``; the same seed always gives the same mask."""
    nonce = bytes(16)  # one stream per seed, and every seed is used for one mask only
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor().update(bytes(8 * size))
    words = np.frombuffer(stream, dtype="<u8").astype(np.uint64)
    return words & np.uint64((1 << modulus_bits) - 1) if modulus_bits < 64 else words


@dataclass(frozen=True)
class Secrets:
    """One client's secrets for one round: two key pairs (encryption, masking), the
    self-mask seed and a seed for its local randomness (rounding, DP noise)."""

    encryption: ec.EllipticCurvePrivateKey
    masking: ec.EllipticCurvePrivateKey
    self_seed: bytes
    local_seed: bytes

    @classmethod
    def from_entropy(cls, entropy: bytes | None = None) -> "Secrets":
        entropy = os.urandom(SEED_BYTES) if entropy is None else entropy
        return cls(encryption=_private_from_entropy(entropy, "secagg encryption key"),
                   masking=_private_from_entropy(entropy, "secagg masking key"),
                   self_seed=derive(entropy, "secagg self mask"),
                   local_seed=derive(entropy, "secagg local randomness"))
