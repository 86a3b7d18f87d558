"""Development PKI: keys Flower itself accepts, a server certificate a real TLS handshake
accepts, and one-line errors for every unusable file."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from fedslm.pki import (
    PkiError,
    init_dev_pki,
    load_ca_certificate,
    load_node_private_key,
    main,
    openssh_public_key,
    write_node_key,
)
from tests.tls_util import tls_handshake


def test_init_writes_ca_server_and_node_keys_with_private_files_0600(tmp_path: Path) -> None:
    paths = init_dev_pki(tmp_path / "certs", ["127.0.0.1", "superlink.lan"], nodes=2)
    assert sorted(paths) == ["ca_cert", "ca_key", "node-1", "node-1.pub", "node-2", "node-2.pub",
                             "server_cert", "server_key"]
    for name in ("ca_key", "server_key", "node-1", "node-2"):
        assert stat.S_IMODE(paths[name].stat().st_mode) == 0o600
    server = load_ca_certificate(paths["server_cert"])
    server.verify_directly_issued_by(load_ca_certificate(paths["ca_cert"]))
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["superlink.lan"]


def test_node_keys_are_what_flower_registers_and_signs_with(tmp_path: Path) -> None:
    private, public = write_node_key(tmp_path / "node")
    key = load_node_private_key(private)
    assert key.curve.name == "secp384r1"
    # Flower's own `flwr supernode register` loader accepts the public file, and it is the
    # public half of the private key the SuperNode signs with.
    assert try_load_public_key(public) == public_key_to_bytes(key.public_key())
    assert public.read_bytes().strip() == openssh_public_key(key)


def test_existing_identities_are_never_replaced(tmp_path: Path) -> None:
    write_node_key(tmp_path / "node")
    with pytest.raises(PkiError, match="a key already exists; refusing to replace"):
        write_node_key(tmp_path / "node")
    init_dev_pki(tmp_path / "certs", ["127.0.0.1"])
    with pytest.raises(PkiError, match=r"already holds a CA \(.*certs/ca.crt\)"):
        init_dev_pki(tmp_path / "certs", ["127.0.0.1"])


def test_the_ca_key_lives_apart_from_what_the_superlink_reads(tmp_path: Path, capsys) -> None:
    from fedslm.pki import main

    assert main(["init", "--out", str(tmp_path / "certs")]) == 0
    key = tmp_path / "certs-ca-key" / "ca.key"
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == ["ca.crt", "server.crt", "server.key"]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    out = capsys.readouterr().out
    assert f"ca_key       {key}  (0600; keep it off the SuperLink's machine" in out
    assert f"the SuperLink reads {tmp_path / 'certs'} (--certs); the CA key is not in it" in out


def test_server_certificate_passes_a_real_tls_handshake_only_with_its_ca(tmp_path: Path) -> None:
    ours = init_dev_pki(tmp_path / "ours", ["127.0.0.1"])
    other = init_dev_pki(tmp_path / "other", ["127.0.0.1"])
    assert tls_handshake(ours, ca=ours["ca_cert"]) == "ok"
    assert "certificate verify failed" in tls_handshake(ours, ca=other["ca_cert"])


def test_unusable_key_files_fail_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(PkiError) as err:
        load_node_private_key(missing)
    assert str(err.value) == (f"{missing}: no such node key file "
                              "(make one with: python -m fedslm.pki node-key PATH)")
    garbage = tmp_path / "garbage"
    garbage.write_text("hello")
    with pytest.raises(PkiError, match=r"garbage: not an unencrypted OpenSSH private key$"):
        load_node_private_key(garbage)
    rsa_key = tmp_path / "rsa"
    rsa_key.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    with pytest.raises(PkiError, match=r"rsa: Flower needs an EC key on a NIST curve"):
        load_node_private_key(rsa_key)
    ed = tmp_path / "ed25519"
    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    with pytest.raises(PkiError, match=r"ed25519: Flower needs an EC key on a NIST curve"):
        load_node_private_key(ed)
    with pytest.raises(PkiError, match=r"garbage: not a PEM certificate$"):
        load_ca_certificate(garbage)


def test_cli_makes_a_node_key_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    assert main(["node-key", str(tmp_path / "device")]) == 0
    assert (tmp_path / "device.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert main(["node-key", str(tmp_path / "device")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
