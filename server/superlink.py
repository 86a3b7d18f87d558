"""Run a SuperLink for a federation of real devices, and register the devices' keys.

    python -m fedslm.server.superlink start --certs certs --database state/superlink.db --host 0.0.0.0
    python -m fedslm.server.superlink register --address superlink.lan:9093 --ca certs/ca.crt nodes/*.pub

``start`` runs Flower's own ``flower-superlink`` with the settings a deployment needs:
TLS on (the files ``init`` of fedslm.pki writes), SuperNode authentication on (only
registered public keys may connect), ``--database`` so runs and registered nodes survive a
restart, the ServerApp in a subprocess, and no runtime dependency installation (the
machines have no internet; the environment already holds every dependency). In Flower
1.41 one port serves the Fleet API (devices), the Control API (``flwr run``, ``flwr
supernode register``) and the Runtime API; see docs/deployment.md for what that means for
who may reach it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedslm.config import is_loopback
from fedslm.flower_tools import flower_bin, flower_env
from fedslm.pki import PkiError, load_ca_certificate

DEFAULT_PORT = 9093
ENV = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


class SuperLinkError(RuntimeError):
    """A SuperLink cannot be started or asked; one line naming the flag and the problem."""


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def from_dir(cls, certs: Path) -> "TlsFiles":
        return cls(certs / "ca.crt", certs / "server.crt", certs / "server.key")

    def check(self) -> None:
        """All three exist and the server certificate was signed by the CA."""
        from cryptography.exceptions import InvalidSignature

        ca = _load(lambda: load_ca_certificate(self.ca_cert), "--certs")
        server = _load(lambda: load_ca_certificate(self.server_cert), "--certs")
        if not self.server_key.is_file():
            raise SuperLinkError(f"--certs: no server key at {self.server_key}")
        if (self.ca_cert.parent / "ca.key").exists():
            raise SuperLinkError(f"--certs: {self.ca_cert.parent} holds ca.key, the CA's private "
                                 "key; move it off the SuperLink's machine (a SuperLink never "
                                 "needs it)")
        try:
            server.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as err:
            raise SuperLinkError(f"--certs: {self.server_cert} was not signed by {self.ca_cert}"
                                 f" ({type(err).__name__})") from None


def _load(fn, flag: str):
    try:
        return fn()
    except PkiError as err:
        raise SuperLinkError(f"{flag}: {err}") from None


def insecure_settings(*, tls: TlsFiles | None, host: str, node_auth: bool) -> list[str]:
    """The settings that leave the SuperLink open ("no TLS", "no node auth")."""
    return [what for what, on in (("no TLS", tls is None), ("no SuperNode authentication",
                                                             not node_auth)) if on]


def superlink_command(*, tls: TlsFiles | None, database: Path, host: str = "127.0.0.1",
                      port: int = DEFAULT_PORT, node_auth: bool = True,
                      i_know_this_is_insecure: bool = False) -> list[str]:
    """``flower-superlink`` for a deployment; ``tls=None`` (insecure) only for local tests.

    Without TLS or node authentication it serves loopback only, unless
    ``i_know_this_is_insecure``: then anyone who reaches ``host`` can read the traffic
    or join as a device."""
    open_settings = insecure_settings(tls=tls, host=host, node_auth=node_auth)
    if open_settings and not is_loopback(host) and not i_know_this_is_insecure:
        flag = "--insecure" if tls is None else "--no-node-auth"
        raise SuperLinkError(f"{flag}: refusing {' and '.join(open_settings)} on {host}, which "
                             "is reachable from other machines; serve 127.0.0.1, or pass "
                             "--i-know-this-is-insecure")
    cmd = [flower_bin("flower-superlink")]
    if tls is None:
        if node_auth:
            raise SuperLinkError("--insecure: SuperNode authentication needs TLS; "
                                 "pass --no-node-auth too (local tests only)")
        cmd.append("--insecure")
    else:
        tls.check()
        cmd += ["--ssl-ca-certfile", str(tls.ca_cert.resolve()),
                "--ssl-certfile", str(tls.server_cert.resolve()),
                "--ssl-keyfile", str(tls.server_key.resolve())]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    cmd += ["--database", str(database.resolve()), "--isolation", "subprocess",
            "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    return cmd


def superlink_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return flower_env(ENV, extra or {})


def write_connection(flwr_home: Path, address: str, *, ca_cert: Path | None,
                     name: str = "fedslm") -> Path:
    """A ``flwr`` CLI config.toml naming one SuperLink connection (TLS unless ca_cert=None)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]",
             f'address = "{address}"',
             f'root-certificates = "{ca_cert.resolve()}"' if ca_cert else "insecure = true"]
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def flwr_cli(args: list[str], *, address: str, ca_cert: Path | None,
             timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run ``flwr <args>`` against the SuperLink at ``address`` with a private config."""
    with tempfile.TemporaryDirectory(prefix="fedslm-flwr-cli-") as home:
        write_connection(Path(home), address, ca_cert=ca_cert)
        return subprocess.run([flower_bin("flwr"), *args], env=superlink_env({"FLWR_HOME": home}),
                              capture_output=True, text=True, timeout=timeout)


def register_node(address: str, public_key: Path, *, ca_cert: Path | None,
                  name: str = "") -> int:
    """Register one SuperNode public key with the SuperLink; returns its node id."""
    if not public_key.is_file():
        raise SuperLinkError(f"{public_key}: no such public key file")
    args = ["supernode", "register", str(public_key.resolve()), "--format", "json"]
    if name:
        args += ["--name", name]
    done = flwr_cli(args, address=address, ca_cert=ca_cert)
    try:
        reply = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        reply = {}
    if done.returncode != 0 or not reply.get("success"):
        lines = (reply.get("error-message") or done.stderr or done.stdout or "no output").strip()
        detail = lines.splitlines()[-1] if lines else f"exit code {done.returncode}"
        raise SuperLinkError(f"registering {public_key} at {address} failed: {detail}")
    return int(reply["node-id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedslm.server.superlink", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="run flower-superlink for a deployment")
    start.add_argument("--certs", type=Path, help="dir with ca.crt, server.crt, server.key")
    start.add_argument("--database", type=Path, required=True,
                       help="SQLite file that keeps runs and registered nodes across restarts")
    start.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept devices")
    start.add_argument("--port", type=int, default=DEFAULT_PORT)
    start.add_argument("--insecure", action="store_true", help="no TLS (local tests only)")
    start.add_argument("--no-node-auth", action="store_true",
                       help="accept any SuperNode (local tests only)")
    start.add_argument("--i-know-this-is-insecure", action="store_true",
                       help="allow --insecure / --no-node-auth on a non-loopback --host")
    reg = sub.add_parser("register", help="register SuperNode public keys")
    reg.add_argument("--address", required=True, help="SuperLink HOST:PORT")
    reg.add_argument("--ca", type=Path, help="CA certificate of the SuperLink (omit: insecure)")
    reg.add_argument("public_keys", type=Path, nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            if not args.insecure and args.certs is None:
                raise SuperLinkError("--certs: required unless --insecure "
                                     "(make them with: python -m fedslm.pki init --out certs)")
            args.database.parent.mkdir(parents=True, exist_ok=True)
            tls = None if args.insecure else TlsFiles.from_dir(args.certs)
            cmd = superlink_command(tls=tls, database=args.database, host=args.host,
                                    port=args.port, node_auth=not args.no_node_auth,
                                    i_know_this_is_insecure=args.i_know_this_is_insecure)
            open_settings = insecure_settings(tls=tls, host=args.host, node_auth=not args.no_node_auth)
            if open_settings and not is_loopback(args.host):
                print(f"WARNING: this SuperLink runs with {' and '.join(open_settings)} on "
                      f"{args.host}: anyone who reaches it can read the traffic or join as a "
                      "device (--i-know-this-is-insecure)", file=sys.stderr, flush=True)
            print(" ".join(cmd), flush=True)
            os.execvpe(cmd[0], cmd, superlink_env())  # becomes flower-superlink: signals go to it
        for key in args.public_keys:
            node_id = register_node(args.address, key, ca_cert=args.ca)
            print(f"{key}: node id {node_id}")
    except SuperLinkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
