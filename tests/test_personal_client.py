"""Personalization on the client: what leaves it, what it keeps, and whether it helps.

These run the real task functions and ClientApp handlers on the builtin tiny Llama and
the built-in synthetic corpus (heterogeneity 1: every client on its own topic/style).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from fedslm.client.app import app
from fedslm.personal_state import (
    STATE_FILE,
    PersonalStateError,
    personal_dir,
    load_personal,
    save_personal,
)
from fedslm.client.task import evaluate, fit
from fedslm import adapters
from fedslm.adapters import to_array_record
from fedslm.config import ExperimentConfig
from fedslm.runconfig import PROJECT_ROOT, to_run_config
from fedslm.server.experiment import initial_adapter
from tests import fakes

NUM_CLIENTS = 3


def experiment(method: str, out: Path, **training) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "personalization": {"method": method, "finetune_steps": 5},
        "federation": {"num_clients": NUM_CLIENTS, "num_rounds": 2},
        "data": {"heterogeneity": 1.0, "docs_per_client": 40},
        "training": {"local_steps": 10, **training},
        "output_dir": str(out),
    })


def fedavg(updates: list[tuple[dict, dict]]) -> dict[str, np.ndarray]:
    total = sum(m["num-examples"] for _, m in updates)
    names = updates[0][0]
    return {n: sum(a[n] * (m["num-examples"] / total) for a, m in updates) for n in names}


# --- what leaves the client --------------------------------------------------------


def _incoming(kind: str, arrays: dict, server_round: int) -> Message:
    return fakes.instruction(7, fakes.round_content(to_array_record(arrays), server_round), kind=kind,
                             message_id=f"{kind}-{server_round}", group_id=str(server_round),
                             created_at=time.time(), ttl=3600.0)


def _context(cfg: ExperimentConfig, partition_id: int) -> Context:
    return Context(run_id=1, node_id=7, state=RecordDict(), run_config=to_run_config(cfg),
                   node_config={"partition-id": partition_id, "num-partitions": NUM_CLIENTS})


def _values(arrays: dict) -> list[np.ndarray]:
    return [np.asarray(a) for a in arrays.values()]


@pytest.mark.parametrize("method", ["split", "finetune", "dual"])
def test_personal_tensors_are_never_in_a_reply(method, tmp_path):
    cfg = experiment(method, tmp_path)
    sent = initial_adapter(cfg)
    ctx = _context(cfg, partition_id=0)
    replies = []
    for rnd in (1, 2):
        train_reply = app(_incoming("train", sent, rnd), ctx)
        eval_reply = app(_incoming("evaluate", sent, rnd), ctx)
        replies.append(train_reply)
        # evaluate replies: scalar metrics only, no tensors
        assert len(eval_reply.content.array_records) == 0
        assert all(isinstance(v, (int, float)) for v in eval_reply.content["metrics"].values())
        assert eval_reply.content["metrics"]["has_personal"] == 1
        assert all(isinstance(v, (int, float)) for v in train_reply.content["metrics"].values())
        sent = train_reply.content["arrays"]
        sent = {n: a.numpy() for n, a in sent.items()}
    state = load_personal(tmp_path / "clients" / "0", method=method)
    assert state is not None and state.round == 2 and state.updates == 2
    personal = _values(state.arrays)
    assert any(p.any() for p in personal)  # trained, not an all-zero placeholder
    shared_names = set(initial_adapter(cfg))
    for reply in replies:
        arrays = {n: a.numpy() for n, a in reply.content["arrays"].items()}
        assert set(arrays) == shared_names  # exactly the shared tensors, by name
        for value in arrays.values():  # and no personal value under any name
            assert not any(np.array_equal(value, p) for p in personal)
    if method == "split":
        assert all(".lora_A." in n for n in shared_names) and len(shared_names) == 4
        assert all(".lora_B." in n for n in state.arrays) and len(state.arrays) == 4


def test_local_only_sends_nothing(tmp_path):
    cfg = experiment("local_only", tmp_path)
    assert initial_adapter(cfg) == {}
    reply = app(_incoming("train", {}, 1), _context(cfg, partition_id=1))
    assert len(reply.content["arrays"]) == 0
    assert reply.content["metrics"]["personal_bytes"] == 8 * 512 * 4
    assert load_personal(tmp_path / "clients" / "1", method="local_only").updates == 1


def test_a_device_agent_state_dir_from_node_config_wins(tmp_path):
    cfg = experiment("split", tmp_path / "run")
    ctx = _context(cfg, partition_id=2)
    ctx.node_config["state-dir"] = str(tmp_path / "agent-state")
    app(_incoming("train", initial_adapter(cfg), 1), ctx)
    assert load_personal(tmp_path / "agent-state", method="split").round == 1  # the device is one client
    assert not (tmp_path / "run" / "clients").exists()


# --- personalization helps where clients differ -------------------------------------


@pytest.mark.parametrize("method", ["dual", "finetune", "split"])
def test_high_heterogeneity_personal_beats_global(method, tmp_path):
    cfg = experiment(method, tmp_path)
    global_arrays = initial_adapter(cfg)
    for rnd in (1, 2):
        updates = [fit(cfg, global_arrays, partition_id=p, server_round=rnd) for p in range(NUM_CLIENTS)]
        global_arrays = fedavg(updates)
    results = [evaluate(cfg, global_arrays, partition_id=p, server_round=2) for p in range(NUM_CLIENTS)]
    assert all(r["has_personal"] == 1 for r in results)
    mean_personal = np.mean([r["personal_perplexity"] for r in results])
    mean_global = np.mean([r["perplexity"] for r in results])
    assert mean_personal < mean_global
    assert np.mean([r["personal_gain"] for r in results]) > 0


# --- state: across rounds, across restarts, before the first round -------------------


@pytest.mark.parametrize("method", ["split", "dual", "local_only"])
def test_evaluated_before_training_reports_global_and_no_personal(method, tmp_path):
    cfg = experiment(method, tmp_path)
    metrics = evaluate(cfg, initial_adapter(cfg), partition_id=2, server_round=0)
    assert metrics["has_personal"] == 0 and metrics["personal_round"] == -1
    for q in ("loss", "perplexity", "accuracy"):
        assert metrics[f"personal_{q}"] == metrics[q]
    assert metrics["personal_gain"] == 0.0
    assert not (tmp_path / "clients").exists()  # evaluating creates no state


def test_personal_state_resumes_across_rounds_and_does_not_leak(tmp_path):
    cfg = experiment("dual", tmp_path)
    g = initial_adapter(cfg)
    untouched = evaluate(cfg, g, partition_id=1, server_round=0)
    fit(cfg, g, partition_id=0, server_round=1)
    first = load_personal(tmp_path / "clients" / "0", method="dual")
    # client 1, with no state, sees nothing of client 0's personal adapter
    assert evaluate(cfg, g, partition_id=1, server_round=1) == untouched
    # round 2 resumes from round 1's state: compare with a client that lost its state
    fresh_dir = tmp_path / "fresh"
    _, m_resumed = fit(cfg, g, partition_id=0, server_round=2)
    _, m_fresh = fit(cfg, g, partition_id=0, server_round=2, client_dir=fresh_dir)
    resumed = load_personal(tmp_path / "clients" / "0", method="dual")
    fresh = load_personal(fresh_dir, method="dual")
    assert (m_resumed["personal_updates"], m_fresh["personal_updates"]) == (2, 1)
    assert (resumed.round, resumed.updates, first.round) == (2, 2, 1)
    assert any(not np.array_equal(resumed.arrays[n], fresh.arrays[n]) for n in resumed.arrays)
    assert any(not np.array_equal(resumed.arrays[n], first.arrays[n]) for n in resumed.arrays)


RESTART = """
import json, sys, numpy as np
from pathlib import Path
from fedslm.config import ExperimentConfig
from fedslm.client.task import evaluate
from fedslm.personal_state import load_personal
from fedslm.adapters import adapter_arrays, load_adapter_arrays
from fedslm.runtime import experiment_model
cfg = ExperimentConfig.from_dict(json.loads(sys.argv[1]))
g = dict(np.load(sys.argv[2]))
metrics = evaluate(cfg, g, partition_id=0, server_round=3)
model, _ = experiment_model(cfg)
load_adapter_arrays(model, load_personal(Path(sys.argv[3]) / "0", method="split").arrays, "personal")
np.savez(sys.argv[4], **adapter_arrays(model, "personal"))
print(json.dumps(metrics))
"""


def test_personal_state_survives_a_process_restart(tmp_path):
    cfg = experiment("split", tmp_path)
    g = initial_adapter(cfg)
    for rnd in (1, 2):
        g = fedavg([fit(cfg, g, partition_id=p, server_round=rnd) for p in range(2)])
    here = evaluate(cfg, g, partition_id=0, server_round=3)
    saved = load_personal(tmp_path / "clients" / "0", method="split")
    np.savez(tmp_path / "global.npz", **g)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, "-c", RESTART, json.dumps(cfg.to_dict()), str(tmp_path / "global.npz"),
         str(tmp_path / "clients"), str(tmp_path / "back.npz")],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path, check=True)
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there == here  # same tensors back -> bit-identical metrics
    back = dict(np.load(tmp_path / "back.npz"))
    assert set(back) == set(saved.arrays)
    assert all(np.array_equal(back[n], saved.arrays[n]) for n in back)


def test_state_of_another_method_is_refused_not_overwritten(tmp_path):
    cfg = experiment("split", tmp_path)
    fit(cfg, initial_adapter(cfg), partition_id=0, server_round=1)
    before = {p.name: p.read_bytes() for p in personal_dir(tmp_path / "clients" / "0").iterdir()}
    dual = experiment("dual", tmp_path)
    with pytest.raises(PersonalStateError, match=r"holds a 'split' personal adapter, this run uses 'dual'"):
        fit(dual, initial_adapter(dual), partition_id=0, server_round=2)
    after = {p.name: p.read_bytes() for p in personal_dir(tmp_path / "clients" / "0").iterdir()}
    assert after == before


def test_failed_state_write_keeps_the_previous_state(tmp_path, monkeypatch):
    cfg = experiment("local_only", tmp_path)
    fit(cfg, {}, partition_id=0, server_round=1)
    directory = personal_dir(tmp_path / "clients" / "0")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    assert json.loads(before[STATE_FILE])["round"] == 1

    def crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        fit(cfg, {}, partition_id=0, server_round=2)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert sorted(p.name for p in directory.parent.iterdir()) == ["personal"]


def test_save_and_load_round_trip(tmp_path):
    arrays = {"a.lora_B.weight": np.arange(6, dtype=np.float32).reshape(3, 2)}
    cfg = experiment("split", tmp_path)
    save_personal(tmp_path / "4", arrays, method="split", server_round=3, updates=2,
                  peft_cfg=cfg.peft, base_model="base")
    state = load_personal(tmp_path / "4", method="split")
    assert (state.round, state.updates, list(state.arrays)) == (3, 2, ["a.lora_B.weight"])
    assert np.array_equal(state.arrays["a.lora_B.weight"], arrays["a.lora_B.weight"])
    assert load_personal(tmp_path / "5", method="split") is None
