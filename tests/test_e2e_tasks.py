"""Each non-default task end to end on Flower's simulation engine, tracked in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from safetensors.numpy import load_file

from tests.proc_util import run_cli, survivors
from tests.stores import sqlite_store

pytestmark = pytest.mark.e2e

TINY = ["federation.num_clients=2", "federation.num_rounds=1", "training.local_steps=4",
        "data.docs_per_client=12"]


def _run(tmp_path: Path, *args: str):
    uri = sqlite_store(tmp_path / "mlflow.db")
    run_dir = tmp_path / "run"
    proc, marker = run_cli([*TINY, *args, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert survivors(marker) == []
    summary = json.loads((run_dir / "summary.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=uri)
    return proc, summary, client, client.get_run(summary["mlflow_run_id"])


def test_classify_reports_pooled_f1_and_a_confusion_matrix(tmp_path: Path) -> None:
    proc, summary, client, run = _run(tmp_path, "task=classify")
    assert summary["task"] == "classify"
    for key in ("eval_accuracy", "eval_macro_f1", "eval_macro_precision", "eval_macro_recall",
                "central_accuracy", "central_macro_f1"):
        assert key in run.data.metrics, key
    assert "macro-F1" in proc.stdout  # the terminal table shows the task's columns
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"confusion.png", "curves.png", "adapter"} <= artifacts
    saved = load_file(str(Path(summary["adapter_dir"]) / "adapter_model.safetensors"))
    assert sorted(n for n in saved if ".lora_" not in n) == ["base_model.model.score.weight"]
    config = json.loads((Path(summary["adapter_dir"]) / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"


def test_instruct_scores_generations_and_logs_examples(tmp_path: Path) -> None:
    proc, summary, client, run = _run(tmp_path, "task=instruct", "task.eval_generations=2",
                                      "task.max_new_tokens=8")
    for key in ("eval_perplexity", "eval_rouge_l", "eval_exact_match", "central_rouge_l"):
        assert key in run.data.metrics, key
    examples = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "examples")}
    assert examples == {"round_000.csv", "round_001.csv"}
    assert "ROUGE-L" in proc.stdout
