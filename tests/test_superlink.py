"""The operator side: the SuperLink command line a deployment runs, and its inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedslm.config import ConfigError, ExperimentConfig
from fedslm.pki import init_dev_pki
from fedslm.server.superlink import SuperLinkError, TlsFiles, register_node, superlink_command, write_connection
from fedslm.simulations.preflight import preflight_deployment


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_deployment_superlink_has_tls_node_auth_a_database_and_no_installs(tmp_path: Path) -> None:
    init_dev_pki(tmp_path / "certs", ["127.0.0.1"])
    cmd = superlink_command(tls=TlsFiles.from_dir(tmp_path / "certs"),
                            database=tmp_path / "state" / "link.db", host="0.0.0.0", port=9093)
    assert Path(cmd[0]).name == "flower-superlink"
    assert "--insecure" not in cmd
    assert flag(cmd, "--ssl-ca-certfile") == str((tmp_path / "certs" / "ca.crt").resolve())
    assert flag(cmd, "--ssl-certfile") == str((tmp_path / "certs" / "server.crt").resolve())
    assert flag(cmd, "--ssl-keyfile") == str((tmp_path / "certs" / "server.key").resolve())
    assert "--enable-supernode-auth" in cmd
    assert flag(cmd, "--database") == str((tmp_path / "state" / "link.db").resolve())
    assert "--disable-runtime-dependency-installation" in cmd
    assert (flag(cmd, "--isolation"), flag(cmd, "--host"), flag(cmd, "--port")) == (
        "subprocess", "0.0.0.0", "9093")


def test_insecure_needs_node_auth_off_and_mismatched_certificates_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SuperLinkError, match=r"^--insecure: SuperNode authentication needs TLS"):
        superlink_command(tls=None, database=tmp_path / "db")
    assert "--insecure" in superlink_command(tls=None, database=tmp_path / "db", node_auth=False)
    ours = init_dev_pki(tmp_path / "ours", ["127.0.0.1"])
    other = init_dev_pki(tmp_path / "other", ["127.0.0.1"])
    mixed = TlsFiles(ca_cert=other["ca_cert"], server_cert=ours["server_cert"],
                     server_key=ours["server_key"])
    with pytest.raises(SuperLinkError) as err:
        mixed.check()
    assert str(err.value) == (f"--certs: {ours['server_cert']} was not signed by "
                              f"{other['ca_cert']} (InvalidSignature)")
    with pytest.raises(SuperLinkError, match=r"^--certs: .*missing/ca.crt: no such CA certificate"):
        TlsFiles.from_dir(tmp_path / "missing").check()
    with pytest.raises(SuperLinkError, match=r"nope.pub: no such public key file$"):
        register_node("127.0.0.1:1", tmp_path / "nope.pub", ca_cert=None)


def test_flwr_connection_uses_the_ca_or_says_insecure(tmp_path: Path) -> None:
    text = write_connection(tmp_path / "a", "10.1.2.3:9093", ca_cert=tmp_path / "ca.crt").read_text()
    assert 'address = "10.1.2.3:9093"' in text
    assert f'root-certificates = "{(tmp_path / "ca.crt").resolve()}"' in text
    assert "insecure = true" in write_connection(tmp_path / "b", "x:1", ca_cert=None).read_text()


def test_remote_engine_needs_tls_unless_explicitly_insecure() -> None:
    with pytest.raises(ConfigError, match=r"^federation.root_certificates: is required for "
                                          r"federation.engine=remote \(TLS is on by default"):
        ExperimentConfig.from_dict({"federation": {"engine": "remote", "address": "h:1"}})
    for local in ("127.0.0.1:1", "localhost:9093", "[::1]:9093"):
        ExperimentConfig.from_dict({"federation": {"engine": "remote", "address": local, "insecure": True}})
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict({"federation": {"engine": "remote", "address": "h:1", "insecure": True}})
    assert str(err.value) == ("federation.insecure: refusing to send a run without TLS to h:1, "
                              "which is not this machine; use federation.root_certificates (or set "
                              "federation.i_know_this_is_insecure=true)")
    ExperimentConfig.from_dict({"federation": {"engine": "remote", "address": "h:1", "insecure": True,
                                               "i_know_this_is_insecure": True}})
    with pytest.raises(ConfigError, match=r"^federation.insecure: contradicts"):
        ExperimentConfig.from_dict({"federation": {"engine": "remote", "address": "h:1",
                                                   "insecure": True, "root_certificates": "/ca"}})


def test_preflight_checks_the_ca_file_and_the_checkpoint_to_resume(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict({"federation": {
        "engine": "remote", "address": "h:1", "root_certificates": str(tmp_path / "ca.crt")}})
    with pytest.raises(ConfigError) as err:
        preflight_deployment(cfg)
    assert str(err.value) == f"federation.root_certificates: {tmp_path / 'ca.crt'}: no such CA certificate file"
    resume = ExperimentConfig.from_dict({"federation": {"resume_from": str(tmp_path)}})
    with pytest.raises(ConfigError, match=r"^federation.resume_from: no checkpoint at "):
        preflight_deployment(resume)
    assert preflight_deployment(ExperimentConfig.from_dict({})) == 0


def test_submitted_paths_are_absolute_and_a_resume_writes_into_its_own_dir(tmp_path: Path,
                                                                          monkeypatch) -> None:
    from fedslm.simulations.run import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = ExperimentConfig.from_dict({
        "output_dir": "/new/hydra/dir",
        "federation": {"engine": "remote", "address": "h:1", "root_certificates": "certs/ca.crt",
                       "resume_from": "outputs/runs/a"}})
    got = absolute_paths(cfg)
    assert got.federation.root_certificates == str(tmp_path / "certs" / "ca.crt")
    assert got.federation.resume_from == str(tmp_path / "outputs" / "runs" / "a")
    assert got.output_dir == got.federation.resume_from
    fresh = absolute_paths(ExperimentConfig.from_dict({"output_dir": "/new/hydra/dir"}))
    assert fresh.output_dir == "/new/hydra/dir"


def test_an_open_superlink_on_a_public_address_needs_the_explicit_flag(tmp_path: Path) -> None:
    with pytest.raises(SuperLinkError) as err:
        superlink_command(tls=None, database=tmp_path / "db", host="0.0.0.0", node_auth=False)
    assert str(err.value) == ("--insecure: refusing no TLS and no SuperNode authentication on "
                              "0.0.0.0, which is reachable from other machines; serve 127.0.0.1, "
                              "or pass --i-know-this-is-insecure")
    init_dev_pki(tmp_path / "certs", ["127.0.0.1"])
    with pytest.raises(SuperLinkError, match=r"^--no-node-auth: refusing no SuperNode "
                                             r"authentication on 10.0.0.5, "):
        superlink_command(tls=TlsFiles.from_dir(tmp_path / "certs"), database=tmp_path / "db",
                          host="10.0.0.5", node_auth=False)
    cmd = superlink_command(tls=None, database=tmp_path / "db", host="0.0.0.0", node_auth=False,
                            i_know_this_is_insecure=True)
    assert "--insecure" in cmd and flag(cmd, "--host") == "0.0.0.0"


def test_start_warns_on_every_open_start_and_exits_2_when_refused(tmp_path: Path, capsys,
                                                                   monkeypatch) -> None:
    from fedslm.server import superlink

    assert superlink.main(["start", "--insecure", "--no-node-auth", "--host", "0.0.0.0",
                           "--database", str(tmp_path / "db")]) == 2
    assert capsys.readouterr().err.startswith("error: --insecure: refusing no TLS")
    def execvpe(*args):  # stop where it would become flower-superlink
        raise SystemExit(0)

    monkeypatch.setattr(superlink.os, "execvpe", execvpe)
    with pytest.raises(SystemExit):
        superlink.main(["start", "--insecure", "--no-node-auth", "--host", "0.0.0.0",
                        "--i-know-this-is-insecure", "--database", str(tmp_path / "db")])
    assert capsys.readouterr().err == (
        "WARNING: this SuperLink runs with no TLS and no SuperNode authentication on 0.0.0.0: "
        "anyone who reaches it can read the traffic or join as a device "
        "(--i-know-this-is-insecure)\n")


def test_a_certs_dir_holding_the_ca_key_is_refused(tmp_path: Path) -> None:
    paths = init_dev_pki(tmp_path / "certs", ["127.0.0.1"])
    TlsFiles.from_dir(tmp_path / "certs").check()
    (tmp_path / "certs" / "ca.key").write_bytes(paths["ca_key"].read_bytes())
    with pytest.raises(SuperLinkError, match=r"holds ca.key, the CA's private key; move it off"):
        TlsFiles.from_dir(tmp_path / "certs").check()
