"""A default run's terminal: our progress and tables, no other library's warnings or bars."""

from __future__ import annotations

import re

import pytest

from tests.proc_util import run_cli

THIRD_PARTY = re.compile(
    r"Warning|warnings\.warn|Loading weights|Since flwr|sqlalchemy|"
    r"configure_train|aggregate_train|clients done|ClientAppActor",
    re.I,
)


@pytest.mark.e2e
def test_a_default_run_prints_no_third_party_warning_lines(tmp_path) -> None:
    proc, _ = run_cli(
        [
            "federation.num_clients=3",
            "federation.num_rounds=2",
            "training.local_steps=2",
            f"output_dir={tmp_path / 'out'}",
            "tracking.uri=sqlite:///" + str(tmp_path / "m.db"),
        ],
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in re.split(r"[\r\n]", proc.stdout + proc.stderr) if ln.strip()]
    assert [ln for ln in lines if THIRD_PARTY.search(ln)] == []
    assert any(ln.startswith("round ") and "2/2 rounds" in ln for ln in lines)  # the progress bar
    assert "Open it with: mlflow ui --backend-store-uri sqlite:///" in proc.stdout
