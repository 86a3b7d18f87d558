"""End to end on Flower's simulation engine: a real SuperLink, Ray, MLflow, PEFT adapter."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
from peft import PeftModel
from safetensors.numpy import load_file

from fedslm.adapters import payload_bytes, to_array_record
from fedslm.model import load_base_model
from tests.proc_util import run_cli, survivors
from tests.stores import sqlite_store

pytestmark = pytest.mark.e2e

SMALL = ["federation.num_clients=3", "training.local_steps=10", "data.docs_per_client=16"]
# what a default (not verbose) run must not print: other libraries' warnings and bars
THIRD_PARTY = re.compile(
    r"Warning|warnings\.warn|Loading weights|Since flwr|sqlalchemy|mlflow\.store|alembic|"
    r"configure_train|aggregate_train|clients done|ClientAppActor",
    re.I,
)
ROUND_METRICS = ["train_loss", "train_loss_min", "train_loss_median", "train_loss_max",
                 "eval_loss", "eval_loss_min", "eval_loss_median", "eval_loss_max",
                 "eval_perplexity", "eval_perplexity_min", "eval_perplexity_median",
                 "eval_perplexity_max", "eval_accuracy", "bytes_up", "bytes_down",
                 "round_seconds", "central_loss", "central_perplexity"]


def test_three_clients_two_rounds(tmp_path: Path) -> None:
    uri = sqlite_store(tmp_path / "mlflow.db")
    run_dir = tmp_path / "run"
    proc, marker = run_cli([*SMALL, "federation.num_rounds=2", f"tracking.uri={uri}",
                            "tracking.experiment=e2e", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert survivors(marker) == []
    assert "round 2/2 train 3/3" in proc.stderr  # the progress bar, redrawn in place
    assert "mlflow ui --backend-store-uri " + uri in proc.stdout
    # a clean terminal: our progress and tables, no other library's warnings or bars
    lines = [ln for ln in re.split(r"[\r\n]", proc.stdout + proc.stderr) if ln.strip()]
    assert [ln for ln in lines if THIRD_PARTY.search(ln)] == []
    assert any(ln.startswith("round ") and "2/2 rounds" in ln for ln in lines)

    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = {r["round"]: r for r in summary["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    assert rounds[2]["eval_loss"] < rounds[0]["eval_loss"]
    assert rounds[2]["central_loss"] < rounds[0]["central_loss"]

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["peft.r"] == "8" and run.data.params["federation.num_clients"] == "3"
    for key in ROUND_METRICS:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert {1, 2} <= set(steps), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "rounds.csv", "clients.csv", "curves.png", "adapter"} <= artifacts
    adapter_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert adapter_files == {"adapter_config.json", "adapter_model.safetensors"}

    # The saved adapter is standard PEFT: it loads onto a fresh base and carries the
    # trained (non-zero) LoRA B matrices.
    base, _ = load_base_model(summary["base_model"], dtype="float32")
    model = PeftModel.from_pretrained(base, summary["adapter_dir"])
    saved = load_file(str(Path(summary["adapter_dir"]) / "adapter_model.safetensors"))
    loaded = {n: p.detach().numpy() for n, p in model.named_parameters() if "lora_" in n}
    assert len(saved) == len(loaded) == 8
    for name, value in saved.items():
        peft_name = name.replace(".weight", ".default.weight")
        np.testing.assert_array_equal(loaded[peft_name], value)
    assert all(np.abs(v).max() > 0 for n, v in saved.items() if "lora_B" in n)

    # Communication: each of 3 clients sends one adapter up, and receives one for train
    # and one for evaluate; an adapter is 4,096 float32 values plus array headers.
    one_adapter = payload_bytes(to_array_record(saved))
    assert sum(v.size for v in saved.values()) == 4096
    assert rounds[1]["bytes_up"] == 3 * one_adapter
    assert rounds[1]["bytes_down"] == 2 * 3 * one_adapter

