"""Certificates and node keys for a deployment: a development CA, the SuperLink's TLS
certificate, and one authentication key pair per SuperNode.

Flower 1.41 authenticates a SuperNode by an EC key on a NIST curve in OpenSSH format
(``flower-supernode --auth-supernode-private-key``; the public half is registered with
``flwr supernode register``), and serves TLS with a PEM certificate. A key pair is best
made on the device itself, so the private key never travels::

    python -m fedslm.pki init --out certs --host 127.0.0.1 --host superlink.lan --nodes 3
    python -m fedslm.pki node-key /var/lib/fedslm/node-key      # on a device

Loaders here raise ``PkiError`` with one line naming the file and what is wrong, so the
agent and the operator helpers can refuse to start before Flower prints a traceback.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NODE_CURVE = ec.SECP384R1()  # Flower accepts any NIST curve; P-384 is its documented one
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")
VALID_DAYS = 365


class PkiError(ValueError):
    """A certificate or key file is missing or unusable; the message names the file."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=days))


def make_ca(common_name: str = "fedslm development CA", *, days: int = VALID_DAYS
            ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that signs the SuperLink's certificate (development use)."""
    key = ec.generate_private_key(ec.SECP384R1())
    builder = (x509.CertificateBuilder().subject_name(_name(common_name))
               .issuer_name(_name(common_name)).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True))
    return key, _validity(builder, days).sign(key, hashes.SHA384())


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     hosts: list[str], *, days: int = VALID_DAYS
                     ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate, valid for every name or IP in ``hosts``."""
    if not hosts:
        raise PkiError("--host: name at least one host name or IP address of the SuperLink")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    builder = (x509.CertificateBuilder().subject_name(_name(hosts[0]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .add_extension(x509.SubjectAlternativeName(names), critical=False)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                              critical=False))
    return key, _validity(builder, days).sign(ca_key, hashes.SHA384())


def make_node_key() -> tuple[bytes, bytes]:
    """(private, public) OpenSSH-format EC key pair that identifies one SuperNode."""
    key = ec.generate_private_key(NODE_CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def write_private(path: Path, data: bytes) -> Path:
    """Write a secret readable by its owner only; never overwrite an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def write_public(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_node_key(private_path: Path) -> tuple[Path, Path]:
    """``<path>`` (private, 0600) and ``<path>.pub``; refuses to replace an existing key."""
    if private_path.exists():
        raise PkiError(f"{private_path}: a key already exists; refusing to replace a node's identity")
    private, public = make_node_key()
    write_private(private_path, private)
    return private_path, write_public(Path(f"{private_path}.pub"), public)


def ca_key_dir(out: Path) -> Path:
    """Where ``init`` keeps the CA's private key: beside ``out``, not in it, so copying
    ``out`` (what the SuperLink reads) to the SuperLink's machine does not carry it."""
    return out.parent / f"{out.name}-ca-key"


def init_dev_pki(out: Path, hosts: list[str], *, nodes: int = 0,
                 key_dir: Path | None = None) -> dict[str, Path]:
    """CA + server certificate (+ ``nodes`` node key pairs under ``out/nodes``); the CA
    key goes to ``key_dir`` (default ``ca_key_dir(out)``, mode 0700, the key 0600)."""
    key_dir = key_dir or ca_key_dir(out)
    for existing in (out / "ca.crt", out / "ca.key", key_dir / "ca.key"):
        if existing.exists():
            raise PkiError(f"{out}: already holds a CA ({existing}); use another --out or remove it")
    ca_key, ca_cert = make_ca()
    server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts)
    key_dir.mkdir(parents=True, exist_ok=True)
    key_dir.chmod(0o700)
    paths = {
        "ca_key": write_private(key_dir / "ca.key", pem_key(ca_key)),
        "ca_cert": write_public(out / "ca.crt", pem_cert(ca_cert)),
        "server_key": write_private(out / "server.key", pem_key(server_key)),
        "server_cert": write_public(out / "server.crt", pem_cert(server_cert)),
    }
    for i in range(1, nodes + 1):
        private, public = write_node_key(out / "nodes" / f"node-{i}")
        paths[f"node-{i}"], paths[f"node-{i}.pub"] = private, public
    return paths


def load_ca_certificate(path: str | Path) -> x509.Certificate:
    """The first certificate of a PEM file, or a one-line PkiError."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{path}: no such CA certificate file") from None
    except OSError as err:
        raise PkiError(f"{path}: cannot read the CA certificate ({err.strerror})") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PkiError(f"{path}: not a PEM certificate") from None


def load_node_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """A SuperNode's OpenSSH EC private key on a NIST curve, or a one-line PkiError."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{path}: no such node key file "
                       "(make one with: python -m fedslm.pki node-key PATH)") from None
    except OSError as err:
        raise PkiError(f"{path}: cannot read the node key ({err.strerror})") from None
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PkiError(f"{path}: not an unencrypted OpenSSH private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in NIST_CURVES:
        raise PkiError(f"{path}: Flower needs an EC key on a NIST curve ({', '.join(NIST_CURVES)})")
    return key


def openssh_public_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedslm.pki", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="development CA, SuperLink certificate, node keys")
    init.add_argument("--out", type=Path, required=True)
    init.add_argument("--host", action="append", default=[],
                      help="SuperLink host name or IP the devices connect to (repeatable)")
    init.add_argument("--nodes", type=int, default=0, help="node key pairs to make")
    init.add_argument("--ca-key-dir", type=Path, default=None,
                      help="where the CA private key goes (default: <out>-ca-key, beside --out)")
    node = sub.add_parser("node-key", help="one SuperNode key pair: PATH and PATH.pub")
    node.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            for name, path in init_dev_pki(args.out, args.host or ["127.0.0.1", "localhost"],
                                           nodes=args.nodes, key_dir=args.ca_key_dir).items():
                note = ("  (0600; keep it off the SuperLink's machine, offline if you can: it "
                        "signs certificates every device trusts)" if name == "ca_key" else "")
                print(f"{name:12} {path}{note}")
            print(f"the SuperLink reads {args.out} (--certs); the CA key is not in it")
        else:
            private, public = write_node_key(args.path)
            print(f"private key  {private}  (stays on the device)")
            print(f"public key   {public}  (register it: python -m fedslm.server.superlink register ...)")
    except PkiError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
