"""A restarted server continues the user-level privacy ledger from its checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import json

import numpy as np
import pytest

from fedslm.config import ExperimentConfig
from fedslm.server.checkpoint import checkpoint_path, make_checkpoint, resume_state, save_checkpoint
from fedslm.server.experiment import privacy_state_hook
from fedslm.server.privacy import (PrivacyStateError, expected_release, load_server_privacy,
                                   save_server_privacy, server_privacy_path,
                            user_level_epsilon)
from fedslm.server.privacy_rounds import setup_privacy
from fedslm.server.rounds import History
from fedslm.server.strategy import build_strategy

ADAPTER = {"a.lora_A.weight": np.ones((2, 3), np.float32)}


def _server(cfg: ExperimentConfig, out: Path):
    strategy, _ = setup_privacy(cfg, build_strategy(cfg), out)
    return strategy, [privacy_state_hook(strategy)]


def _config(out: Path, **federation) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "privacy": {"mode": "dp_fedavg", "noise_multiplier": 1.0, "delta": 1e-3},
        "federation": {"num_clients": 10, "num_rounds": 3, **federation},
        "strategy": {"fraction_train": 0.5},
        "output_dir": str(out)})


def test_resumed_server_continues_epsilon_from_the_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _config(out)
    strategy, hooks = _server(cfg, out)
    strategy.state.releases.append(expected_release(cfg, 1))
    strategy.state.rounds_done = 1
    eps_round1 = strategy.state.epsilon()
    save_server_privacy(strategy.state, server_privacy_path(out))  # at the release
    save_checkpoint(checkpoint_path(out), make_checkpoint(
        1, ADAPTER, strategy, History(), mlflow_run_id="run-1", cfg=cfg, hooks=hooks))

    resumed_cfg = _config(out, resume_from=str(out))
    restarted, restarted_hooks = _server(resumed_cfg, out)
    ckpt = resume_state(resumed_cfg, restarted, restarted_hooks)
    assert ckpt is not None and ckpt.round == 1 and ckpt.mlflow_run_id == "run-1"
    assert restarted.state.epsilon() == eps_round1 > 0  # ... the resumed one continues
    assert restarted.state.rounds_done == 1

    restarted.state.releases.append(expected_release(resumed_cfg, 2))
    uninterrupted = user_level_epsilon([expected_release(cfg, 1), expected_release(cfg, 2)],
                                       delta=1e-3)
    assert abs(restarted.state.epsilon() - uninterrupted) < 1e-12
    assert restarted.state.epsilon() > eps_round1


def test_the_ledger_with_more_releases_wins_on_resume(tmp_path: Path) -> None:
    """A release made after the last checkpoint (e.g. sent for evaluation just before a
    crash) is in server_privacy.json; resuming from the older checkpoint keeps it."""
    out = tmp_path / "run"
    cfg = _config(out)
    strategy, hooks = _server(cfg, out)
    strategy.state.releases.append(expected_release(cfg, 1))
    save_checkpoint(checkpoint_path(out), make_checkpoint(
        1, ADAPTER, strategy, History(), mlflow_run_id="run-1", cfg=cfg, hooks=hooks))
    strategy.state.releases.append(expected_release(cfg, 2))
    save_server_privacy(strategy.state, server_privacy_path(out))

    resumed_cfg = dataclasses.replace(cfg, federation=dataclasses.replace(
        cfg.federation, resume_from=str(out)))
    restarted, restarted_hooks = _server(resumed_cfg, out)
    resume_state(resumed_cfg, restarted, restarted_hooks)
    assert len(restarted.state.releases) == 2
    assert restarted.state.epsilon() == strategy.state.epsilon()


def _one_release_run(out: Path):
    cfg = _config(out)
    strategy, hooks = _server(cfg, out)
    strategy.state.releases.append(expected_release(cfg, 1))
    save_server_privacy(strategy.state, server_privacy_path(out))
    save_checkpoint(checkpoint_path(out), make_checkpoint(
        1, ADAPTER, strategy, History(), mlflow_run_id="run-1", cfg=cfg, hooks=hooks))
    resumed_cfg = _config(out, resume_from=str(out))
    return resumed_cfg


def test_a_checkpoint_whose_privacy_file_vanished_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    resumed_cfg = _one_release_run(out)
    server_privacy_path(out).unlink()
    restarted, hooks = _server(resumed_cfg, out)
    with pytest.raises(PrivacyStateError, match=r"server_privacy.json: holds 0 releases that do "
                       r"not continue the checkpoint's 1 .*refusing to resume$"):
        resume_state(resumed_cfg, restarted, hooks)


def test_a_privacy_file_edited_without_its_digest_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _one_release_run(out)
    path = server_privacy_path(out)
    data = json.loads(path.read_text())
    data["releases"] = []  # "lower" the ledger
    path.write_text(json.dumps(data))
    with pytest.raises(PrivacyStateError, match=r"does not match its sha256 \(edited or partly "
                       r"written\); refusing to continue the ledger from it$"):
        load_server_privacy(path)


def test_a_privacy_file_from_another_moment_is_refused(tmp_path: Path) -> None:
    """Both files intact, but the file lost the checkpoint's release and gained another:
    a pair put together from different runs or moments."""
    out = tmp_path / "run"
    resumed_cfg = _one_release_run(out)
    state = load_server_privacy(server_privacy_path(out))
    state.releases = [dataclasses.replace(state.releases[0], sample_size=1)]
    save_server_privacy(state, server_privacy_path(out))
    restarted, hooks = _server(resumed_cfg, out)
    with pytest.raises(PrivacyStateError, match="holds 1 releases that do not continue"):
        resume_state(resumed_cfg, restarted, hooks)
