"""What the node config tells a ClientApp, and training on a device's own files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedslm.client.node import node_setup, read_participation, record_participation
from fedslm.client.task import evaluate, fit
from fedslm.training import pack_texts
from fedslm.adapters import adapter_arrays
from fedslm.config import ExperimentConfig
from fedslm.data.local import local_split
from fedslm.runtime import peft_model


def test_simulation_node_uses_its_partition_under_the_simulation_base() -> None:
    me = node_setup({"partition-id": 3, "num-partitions": 10}, node_id=987654321,
                    simulation_base=Path("/runs/a/clients"))
    assert (me.partition_id, me.data_path) == (3, "")
    assert me.state_dir == Path("/runs/a/clients/3")
    assert me.participation_log is None


def test_device_node_uses_its_data_path_and_state_dir() -> None:
    node_id = 2**63 + 12345  # Flower node ids are uint64
    me = node_setup({"data-path": "/home/u/notes", "state-dir": "/var/lib/fedslm"},
                    node_id=node_id, simulation_base=Path("/server/path/never/used"))
    assert me.partition_id == node_id % (2**31 - 1)
    assert me.data_path == "/home/u/notes"
    assert me.state_dir == Path("/var/lib/fedslm")
    assert me.participation_log == Path("/var/lib/fedslm/participation.jsonl")


def test_participation_log_appends_across_calls(tmp_path: Path) -> None:
    log = tmp_path / "state" / "participation.jsonl"
    record_participation(log, run_id=7, server_round=1, phase="train",
                         metrics={"loss": 2.5, "num-examples": 40, "steps": 2, "seconds": 0.3})
    record_participation(log, run_id=7, server_round=1, phase="evaluate", metrics={"loss": 2.4})
    rows = read_participation(tmp_path / "state")
    assert [(r["run_id"], r["round"], r["phase"]) for r in rows] == [(7, 1, "train"), (7, 1, "evaluate")]
    assert {k: rows[0][k] for k in ("loss", "num-examples", "steps")} == {
        "loss": 2.5, "num-examples": 40, "steps": 2}
    assert "seconds" not in rows[0]
    record_participation(None, run_id=7, server_round=2, phase="train", metrics={})


def test_fit_on_a_device_reads_only_its_data_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "notes"
    data.mkdir()
    lines = [f"the farmer repairs the bridge number {i} near the harbour." for i in range(30)]
    (data / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in lines) + "\n")
    (data / "b.txt").write_text("a doctor watches the winter storm.\n\nmy neighbour sells bread.\n")
    cfg = ExperimentConfig.from_dict({
        "model": {"name_or_path": str(tiny_model_dir)},
        "training": {"local_steps": 1, "batch_size": 2, "seq_len": 16}})
    model, tokenizer = peft_model(cfg.model, cfg.peft, data_seed=cfg.data.seed)
    start = adapter_arrays(model)
    # partition 123 does not exist among the 10 simulated clients: any read of the
    # simulated corpus would raise, so the numbers below come from the files alone.
    arrays, metrics = fit(cfg, start, partition_id=123, server_round=1, data_path=str(data))
    split = local_split(str(data), text_key="text", test_fraction=0.2, seed=0)
    assert len(split.train) + len(split.test) == 32
    assert metrics["num-examples"] == pack_texts(split.train, tokenizer, seq_len=16).shape[0]
    assert metrics["steps"] == 1
    assert any(not np.array_equal(arrays[k], start[k]) for k in start)
    result = evaluate(cfg, arrays, partition_id=123, data_path=str(data))
    assert result["num-examples"] == pack_texts(split.test, tokenizer, seq_len=16).shape[0]
