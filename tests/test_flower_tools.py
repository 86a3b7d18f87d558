"""Every environment handed to a Flower process: our bin dir first, telemetry off."""

from __future__ import annotations

import os

from fedslm.flower_tools import BIN_DIR, flower_env


def test_bin_dir_leads_path_and_layers_override(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin")
    env = flower_env({"A": "1"}, {"A": "2"})
    assert env["PATH"].split(os.pathsep) == [str(BIN_DIR), "/usr/bin"]
    assert env["A"] == "2"


def test_telemetry_is_off_unless_the_user_turned_it_on(monkeypatch) -> None:
    monkeypatch.delenv("FLWR_TELEMETRY_ENABLED", raising=False)
    assert flower_env()["FLWR_TELEMETRY_ENABLED"] == "0"
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    assert flower_env()["FLWR_TELEMETRY_ENABLED"] == "1"
