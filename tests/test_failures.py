"""A failing client: the operator sees the real error class (and, in simulation, its
message); a device sends only the class and a fixed reason code and keeps the rest."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.common.constant import ErrorCode

from fedslm.client.failures import failure_report_mod, failure_reason
from fedslm.client.privacy import LedgerError
from tests.proc_util import run_cli, survivors

SECRET = "/home/alice/medical-notes/privacy.json: unreadable privacy ledger (line 3: 'diagnosis')"


def _msg() -> Message:
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=5,
                        reply_to_message_id="", group_id="1", created_at=0.0, ttl=60.0,
                        message_type="train")
    return make_message(metadata, RecordDict())


def _context(**node_config) -> Context:
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})


def _fails(msg: Message, context: Context) -> Message:
    raise LedgerError(SECRET + "\nsecond line")


def test_in_simulation_the_server_gets_class_and_first_line() -> None:
    reply = failure_report_mod(_msg(), _context(**{"partition-id": 1}), _fails)
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason == f"LedgerError: {SECRET}"


def test_a_device_sends_class_and_code_and_logs_the_rest(caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="fedslm.client"):
        reply = failure_report_mod(_msg(), _context(**{"state-dir": "/var/lib/fedslm"}), _fails)
    assert reply.error.reason == "LedgerError: privacy-ledger-unusable"
    assert SECRET in caplog.text  # the full message stays in the device's own log
    assert failure_reason(PermissionError(13, "denied", "/home/alice/x"), device=True) == (
        "PermissionError: local-file-permission")
    assert failure_reason(KeyError("/home/alice"), device=True) == "KeyError: client-error"


def test_a_reply_passes_through_untouched() -> None:
    msg = _msg()
    assert failure_report_mod(msg, _context(), lambda m, c: m) is msg


@pytest.mark.e2e
def test_simulation_shows_the_clients_real_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "clients" / "1").mkdir(parents=True)
    (run_dir / "clients" / "1" / "privacy.json").write_text("{ truncated")
    proc, marker = run_cli(["federation.num_clients=2", "federation.num_rounds=1",
                            "training.local_steps=2", "data.docs_per_client=16", "privacy=dp_sgd",
                            "strategy.min_train_clients=1", "strategy.min_evaluate_clients=1",
                            "federation.initial_evaluation=false", "tracking.enabled=false",
                            f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert survivors(marker) == []
    with open(run_dir / "clients.csv") as fh:
        failed = [r for r in csv.DictReader(fh) if r["status"] == "failed"]
    assert {r["phase"] for r in failed} == {"train"}
    assert failed[0]["error"].startswith("LedgerError: ")
    assert "clients/1/privacy.json: unreadable privacy ledger" in failed[0]["error"]
    assert "failed: LedgerError: " in proc.stdout
