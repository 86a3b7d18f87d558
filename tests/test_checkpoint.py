"""Round checkpoints: exact round trips of adapter, strategy moments, history, RNG and hook
state; atomic replacement; and the rules that refuse a checkpoint of another experiment."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM

from fedslm.config import ConfigError, ExperimentConfig
from fedslm.server.checkpoint import (
    Checkpoint,
    StateHook,
    check_resumable,
    checkpoint_path,
    load_checkpoint,
    make_checkpoint,
    restore_hooks,
    restore_strategy_state,
    resume_state,
    save_checkpoint,
    set_random_state,
    strategy_state,
)
from fedslm.server.rounds import History
from tests import fakes

NAMES = ("a.lora_A.weight", "a.lora_B.weight")


def arrays(value: float) -> dict[str, np.ndarray]:
    return {"a.lora_A.weight": np.full((2, 3), value, np.float32),
            "a.lora_B.weight": np.full((3, 2), -value, np.float32)}


def record(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in values.items()})


def reply(node: int, values: dict[str, np.ndarray], n: int) -> Message:
    return fakes.train_reply(node, values, num_examples=n)


def one_round(strategy, current: dict[str, np.ndarray], rnd: int, updates) -> dict[str, np.ndarray]:
    """configure_train (records the current arrays) then aggregate hand-built replies."""
    if hasattr(strategy, "current_arrays"):
        if isinstance(strategy, FedAvgM):
            strategy.current_arrays = strategy.current_arrays or record(current)
        else:
            strategy.current_arrays = {k: v.copy() for k, v in current.items()}
    new, _ = strategy.aggregate_train(rnd, [reply(i + 1, u, n) for i, (u, n) in enumerate(updates)])
    return {k: v.numpy() for k, v in new.items()}


def test_fedadam_moments_survive_a_restart_exactly(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict({"strategy": {"name": "fedadam"}})
    uninterrupted = FedAdam(eta=0.01, eta_l=0.003, tau=0.001)
    x1 = one_round(uninterrupted, arrays(0.0), 1, [(arrays(1.0), 1), (arrays(3.0), 3)])
    ckpt = make_checkpoint(1, x1, uninterrupted, History(), mlflow_run_id="run-1", cfg=cfg, hooks=[])
    save_checkpoint(checkpoint_path(tmp_path), ckpt)

    restarted = FedAdam(eta=0.01, eta_l=0.003, tau=0.001)
    loaded = load_checkpoint(checkpoint_path(tmp_path))
    restore_strategy_state(restarted, loaded.strategy_state)
    for k in NAMES:
        np.testing.assert_array_equal(restarted.m_t[k], uninterrupted.m_t[k])
        np.testing.assert_array_equal(restarted.v_t[k], uninterrupted.v_t[k])
        np.testing.assert_array_equal(loaded.arrays[k], x1[k])
    round2 = [(arrays(2.0), 2), (arrays(-1.0), 2)]
    expected = one_round(uninterrupted, x1, 2, round2)
    resumed = one_round(restarted, loaded.arrays, 2, round2)
    for k in NAMES:
        np.testing.assert_array_equal(resumed[k], expected[k])
    fresh = one_round(FedAdam(eta=0.01, eta_l=0.003, tau=0.001), x1, 2, round2)
    assert not np.allclose(fresh[NAMES[0]], expected[NAMES[0]])  # the moments matter


def test_fedavgm_momentum_round_trips_in_order(tmp_path: Path) -> None:
    strategy = FedAvgM(server_learning_rate=1.0, server_momentum=0.9)
    one_round(strategy, arrays(0.0), 1, [(arrays(1.0), 1), (arrays(2.0), 1)])
    state = strategy_state(strategy)
    assert sorted(state) == ["0/momentum_vector/0000", "0/momentum_vector/0001"]
    again = FedAvgM(server_learning_rate=1.0, server_momentum=0.9)
    restore_strategy_state(again, state)
    for got, want in zip(again.momentum_vector, strategy.momentum_vector, strict=True):
        np.testing.assert_array_equal(got, want)


def test_fedavg_has_no_state_and_refuses_foreign_state() -> None:
    assert strategy_state(FedAvg()) == {}
    with pytest.raises(ConfigError, match=r"^federation.resume_from: the checkpoint holds strategy "
                                          r"state 'm_t' that strategy FedAvg does not have$"):
        restore_strategy_state(FedAvg(), {"0/m_t/a": np.zeros(2)})


def full_checkpoint(rnd: int, cfg: ExperimentConfig) -> Checkpoint:
    history = History(rounds=[{"round": 0, "eval_loss": 2.5}, {"round": 1, "train_loss": 2.25}],
                      clients=[{"round": 1, "phase": "train", "node_id": 7, "status": "timed_out",
                                "error": ""}])
    return Checkpoint(round=rnd, arrays=arrays(float(rnd)), strategy_state={}, history=history,
                      mlflow_run_id="abc", config=cfg.to_dict(), random_state=[],
                      extra={"privacy_accountant": {"steps": rnd, "history": [[1.1, 0.01, 40]]}})


def test_checkpoint_round_trip_keeps_history_run_id_and_hook_state(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict({})
    save_checkpoint(checkpoint_path(tmp_path), full_checkpoint(3, cfg))
    got = load_checkpoint(checkpoint_path(tmp_path))
    assert (got.round, got.mlflow_run_id) == (3, "abc")
    assert got.history.rounds == [{"round": 0, "eval_loss": 2.5}, {"round": 1, "train_loss": 2.25}]
    assert got.history.clients[0]["status"] == "timed_out"
    assert got.extra == {"privacy_accountant": {"steps": 3, "history": [[1.1, 0.01, 40]]}}
    assert got.config == cfg.to_dict()


def test_a_crash_while_writing_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    cfg = ExperimentConfig.from_dict({})
    path = checkpoint_path(tmp_path)
    save_checkpoint(path, full_checkpoint(1, cfg))
    good = path.read_bytes()

    def dies_halfway(fh, **payload):
        fh.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr("fedslm.server.checkpoint.np.savez", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, full_checkpoint(2, cfg))
    assert path.read_bytes() == good
    assert load_checkpoint(path).round == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]  # no temp file left


def test_unreadable_or_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^federation.resume_from: no checkpoint at .*checkpoint.npz"):
        load_checkpoint(checkpoint_path(tmp_path))
    checkpoint_path(tmp_path).write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match=r"is not a readable checkpoint \(\w+\)$"):
        load_checkpoint(checkpoint_path(tmp_path))


def test_only_the_same_experiment_may_continue_a_checkpoint() -> None:
    base = {"federation": {"num_rounds": 3}}
    ckpt = full_checkpoint(2, ExperimentConfig.from_dict(base))
    check_resumable(ckpt, ExperimentConfig.from_dict(  # deadline, rounds, address may change
        {"federation": {"num_rounds": 5, "round_timeout": 30.0, "resume_from": "/x"},
         "output_dir": "/elsewhere"}))
    with pytest.raises(ConfigError) as err:
        check_resumable(ckpt, ExperimentConfig.from_dict({**base, "peft": {"r": 16}}))
    assert str(err.value) == ("federation.resume_from: the checkpoint was made with peft.r=8, "
                              "this run has peft.r=16")
    with pytest.raises(ConfigError, match=r"^federation.num_rounds: 1 is below the 2 rounds"):
        check_resumable(ckpt, ExperimentConfig.from_dict(
            {"federation": {"num_rounds": 1}, "strategy": {"min_train_clients": 2}}))


def test_hook_state_is_restored_and_never_silently_reset() -> None:
    cfg = ExperimentConfig.from_dict({})
    ckpt = full_checkpoint(2, cfg)
    loaded: dict = {}
    restore_hooks(ckpt, [StateHook("privacy_accountant", dict, loaded.update)])
    assert loaded == {"steps": 2, "history": [[1.1, 0.01, 40]]}
    with pytest.raises(ConfigError, match="holds 'privacy_accountant' state but this run has nothing"):
        restore_hooks(ckpt, [])
    ckpt.extra = {}
    with pytest.raises(ConfigError, match="has no 'privacy_accountant' state; refusing to start it"):
        restore_hooks(ckpt, [StateHook("privacy_accountant", dict, loaded.update)])


def test_resume_restores_client_sampling_rng(tmp_path: Path) -> None:
    random.seed(5)
    cfg = ExperimentConfig.from_dict({"output_dir": str(tmp_path)})
    save_checkpoint(checkpoint_path(tmp_path),
                    make_checkpoint(1, arrays(1.0), FedAvg(), History(), mlflow_run_id="r",
                                    cfg=cfg, hooks=[]))
    expected = random.sample(range(100), 5)
    random.seed(99)
    resumed_cfg = ExperimentConfig.from_dict({"output_dir": str(tmp_path),
                                              "federation": {"resume_from": str(tmp_path)}})
    ckpt = resume_state(resumed_cfg, FedAvg(), [])
    assert ckpt is not None and ckpt.round == 1
    assert random.sample(range(100), 5) == expected
    set_random_state([])  # an empty state (older checkpoint) leaves the RNG alone
    assert resume_state(ExperimentConfig.from_dict({}), FedAvg(), []) is None


def test_truncated_or_edited_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict({})
    path = checkpoint_path(tmp_path)
    save_checkpoint(path, full_checkpoint(2, cfg))
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ConfigError, match=r"is not a readable checkpoint \(BadZipFile\)$"):
        load_checkpoint(path)
    # a consistent npz with one value changed (the round) but the old digest kept
    with np.load(io.BytesIO(good)) as data:
        payload = {k: data[k] for k in data.files}
    meta = json.loads(payload["meta"].tobytes())
    meta["round"] = 1
    payload["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **payload)
    with pytest.raises(ConfigError, match=r"does not match its sha256 \(corrupt or edited\)"):
        load_checkpoint(path)
