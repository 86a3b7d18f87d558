"""End to end on Flower's simulation engine: a simulated attacker, the default bounds and a
robust rule together, through real messages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.proc_util import run_cli, survivors

pytestmark = pytest.mark.e2e


def test_a_scaled_attacker_is_clipped_and_fedmedian_aggregates(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc, marker = run_cli(["federation.num_clients=3", "federation.num_rounds=1",
                            "federation.initial_evaluation=false", "training.local_steps=5",
                            "data.docs_per_client=16", "tracking.enabled=false",
                            "strategy=fedmedian", "attack=scale", "attack.fraction=0.34",
                            "attack.scale=1000", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert survivors(marker) == []
    summary = json.loads((run_dir / "summary.json").read_text())
    round1 = {r["round"]: r for r in summary["rounds"]}[1]
    assert round1["robust_clipped_fraction"] == pytest.approx(1 / 3)
    assert round1["central_perplexity"] < 20
    with open(run_dir / "clients.csv") as fh:
        train = [r for r in csv.DictReader(fh) if r["phase"] == "train"]
    notes = [r["screening"] for r in train if r.get("screening")]
    assert len(notes) == 1 and notes[0].startswith("delta norm ")
