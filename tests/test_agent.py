"""The device agent refuses to start, with one line naming the flag, when its data, key or
certificate is unusable; and what it hands Flower is what Flower reads."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
import torch
from flwr.common.config import parse_config_args

from fedslm.client.agent import (
    AgentConfig,
    AgentError,
    check_certificate,
    check_data,
    check_device,
    check_key,
    main,
    supernode_command,
    write_node_config,
)
from fedslm.data.core import DataError
from fedslm.data.local import local_split
from fedslm.pki import init_dev_pki, write_node_key
from fedslm.simulations.local_deployment import free_port
from tests.tls_util import plain_server, tls_server


def texts_dir(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "notes.jsonl", "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"text": f"note number {i} about the harbour"}) + "\n")
    return root


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return init_dev_pki(tmp_path_factory.mktemp("pki"), ["127.0.0.1"], nodes=1)


def test_data_problems_are_named_in_one_line(tmp_path: Path) -> None:
    def problem(path: Path) -> str:
        with pytest.raises(DataError) as err:
            local_split(str(path), text_key="text", test_fraction=0.2, seed=0)
        return str(err.value)

    (tmp_path / "empty").mkdir()
    assert problem(tmp_path / "empty") == (
        f"data-path: no .txt/.jsonl/.json/.csv/.tsv/.parquet files under {tmp_path / 'empty'}")
    assert problem(tmp_path / "missing") == f"data-path: {tmp_path / 'missing'} does not exist"
    assert problem(texts_dir(tmp_path / "one", 1)).startswith(
        f"data-path: {tmp_path / 'one'} holds 1 text(s); need at least 2")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"text": "fine"}\n{not json\n')
    assert problem(bad).startswith(f"data-path: {bad / 'a.jsonl'}:2: malformed JSON")
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "a.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    assert problem(binary).startswith(f"data-path: {binary / 'a.txt'} is not UTF-8 text")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_data_is_named(tmp_path: Path) -> None:
    data = texts_dir(tmp_path / "data", 3)
    (data / "notes.jsonl").chmod(0)
    with pytest.raises(DataError, match=r"^data-path: cannot read .*notes.jsonl"):
        local_split(str(data), text_key="text", test_fraction=0.2, seed=0)


def test_agent_checks_data_in_a_child_process(tmp_path: Path) -> None:
    assert check_data(texts_dir(tmp_path / "ok", 5)) == 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(AgentError) as err:
        check_data(tmp_path / "empty")
    assert str(err.value) == f"--data-path: no .txt/.jsonl/.json/.csv/.tsv/.parquet files under {tmp_path / 'empty'}"


def test_key_checks_name_the_problem(tmp_path: Path) -> None:
    private, public = write_node_key(tmp_path / "node")
    assert check_key(private) + b"\n" == public.read_bytes()
    with pytest.raises(AgentError, match=r"^--auth-key: .*nope: no such node key file"):
        check_key(tmp_path / "nope")
    with pytest.raises(AgentError, match=r"^--auth-key: .*node.pub: not an unencrypted OpenSSH"):
        check_key(public)


def test_certificate_is_checked_against_the_live_superlink(pki: dict[str, Path], tmp_path: Path) -> None:
    with tls_server(pki["server_cert"], pki["server_key"]) as port:
        assert check_certificate(f"127.0.0.1:{port}", pki["ca_cert"]) is True
        other = init_dev_pki(tmp_path / "other", ["127.0.0.1"])
        with pytest.raises(AgentError) as err:
            check_certificate(f"127.0.0.1:{port}", other["ca_cert"])
        assert str(err.value).startswith(f"--root-certificates: {other['ca_cert']} does not verify "
                                         f"the certificate of the SuperLink at 127.0.0.1:{port} (")
        with pytest.raises(AgentError, match=r"--root-certificates: .*server.key: not a PEM certificate"):
            check_certificate(f"127.0.0.1:{port}", pki["server_key"])
    with plain_server() as port:
        with pytest.raises(AgentError, match=r"^--superlink: TLS handshake with .* failed .*only "
                                             r"connects over TLS$"):
            check_certificate(f"127.0.0.1:{port}", pki["ca_cert"])
    assert check_certificate(f"127.0.0.1:{free_port()}", pki["ca_cert"]) is False  # not up yet
    with pytest.raises(AgentError, match=r"^--superlink: expected HOST:PORT, got 'superlink'$"):
        check_certificate("superlink", pki["ca_cert"])


def test_main_refuses_to_start_with_one_line_and_exit_2(pki: dict[str, Path], tmp_path: Path,
                                                        capsys) -> None:
    common = ["--superlink", f"127.0.0.1:{free_port()}", "--root-certificates", str(pki["ca_cert"]),
              "--state-dir", str(tmp_path / "state")]
    assert main([*common, "--auth-key", str(pki["node-1"]), "--data-path", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == f"error: --data-path: {tmp_path / 'x'} does not exist\n"
    data = texts_dir(tmp_path / "data", 4)
    assert main([*common, "--auth-key", str(tmp_path / "none"), "--data-path", str(data)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --auth-key: {tmp_path / 'none'}: no such")
    assert not (tmp_path / "state").exists()  # nothing written before the checks pass
    if not torch.cuda.is_available():
        assert main([*common, "--auth-key", str(pki["node-1"]), "--data-path", str(data),
                     "--device", "cuda"]) == 2
        assert capsys.readouterr().err == ("error: --device: cuda was requested but torch sees no "
                                           "CUDA GPU on this machine (use training.device=auto or cpu)\n")


def test_device_cpu_is_taken_as_is_and_auto_is_asked_of_torch_in_a_child(monkeypatch) -> None:
    import fedslm.client.agent as agent

    assert check_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(agent.subprocess, "run", lambda *a, **k: pytest.fail("probed cpu"))
    assert check_device("cpu") == "cpu"


def test_node_config_reaches_flower_intact_and_tls_is_never_off(tmp_path: Path) -> None:
    odd = tmp_path / 'my "notes" dir'
    cfg = AgentConfig(superlink="10.0.0.5:9093", root_certificates=tmp_path / "ca.crt",
                      auth_key=tmp_path / "key", data_path=odd, state_dir=tmp_path / "st ate")
    cfg.state_dir.mkdir()
    path = write_node_config(cfg)
    expected = {"data-path": str(odd.resolve()), "state-dir": str(cfg.state_dir.resolve()),
                "device": "auto"}
    assert tomllib.loads(path.read_text()) == expected
    assert parse_config_args([str(path)]) == expected  # what flower-supernode does with it
    cmd = supernode_command(cfg, path)
    assert "--insecure" not in cmd
    assert cmd[cmd.index("--root-certificates") + 1] == str((tmp_path / "ca.crt").resolve())
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str((tmp_path / "key").resolve())
    assert cmd[cmd.index("--node-config") + 1] == str(path)


def test_agent_checks_data_in_the_tasks_format(tmp_path):
    (tmp_path / "labelled.csv").write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(6)))
    assert check_data(tmp_path / "labelled.csv", "classify") == 6
    (tmp_path / "chat.jsonl").write_text("".join(
        f'{{"instruction": "say {i}", "output": "{i}"}}\n' for i in range(4)))
    assert check_data(tmp_path / "chat.jsonl", "instruct") == 4
    (tmp_path / "plain.txt").write_text("one paragraph\n\nanother one\n")
    with pytest.raises(AgentError, match=r"^--data-path: .*plain.txt is plain text; task.name=classify"):
        check_data(tmp_path / "plain.txt", "classify")
