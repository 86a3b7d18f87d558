"""The privacy group composes; bad or unsafe privacy configs fail naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedslm.config import ConfigError
from fedslm.runconfig import from_run_config, to_run_config
from tests.hydra_util import CONF_DIR, compose_experiment


def test_privacy_groups_compose_with_their_defaults(tmp_path: Path) -> None:
    assert compose_experiment([], tmp_path).privacy.mode == "none"
    sgd = compose_experiment(["privacy=dp_sgd"], tmp_path).privacy
    assert (sgd.mode, sgd.accountant_name(), sgd.grad_sample_mode) == ("dp_sgd", "prv", "hooks")
    fedavg = compose_experiment(["privacy=dp_fedavg", "privacy.clipping=adaptive",
                                 "privacy.clipped_count_stddev=1.0"], tmp_path).privacy
    assert (fedavg.mode, fedavg.accountant_name(), fedavg.clipping) == ("dp_fedavg", "rdp", "adaptive")
    assert from_run_config(to_run_config(compose_experiment(["privacy=dp_sgd"], tmp_path))).privacy == sgd


@pytest.mark.parametrize(("overrides", "message"), [
    (["privacy=dp_sgd", "privacy.noise_multiplier=-0.5"], "privacy.noise_multiplier: must be >= 0, got -0.5"),
    (["privacy=dp_sgd", "privacy.delta=1"], "privacy.delta: must be in [0, 1) (0 = 1/(10 n)), got 1.0"),
    (["privacy=dp_sgd", "privacy.max_grad_norm=0"], "privacy.max_grad_norm: must be > 0, got 0.0"),
    (["privacy=dp_sgd", "privacy.accountant=gdp"], "privacy.accountant: unknown value 'gdp'"),
    (["privacy=dp_sgd", "privacy.grad_sample_mode=functorch"], "privacy.grad_sample_mode: unknown value"),
    (["privacy=dp_sgd", "strategy=fedprox"], "strategy.proximal_mu: must be 0 with privacy.mode=dp_sgd"),
    (["privacy=dp_fedavg", "strategy=fedadam"], "strategy.name: privacy.mode=dp_fedavg cannot wrap fedadam"),
    (["privacy=dp_fedavg", "strategy=fedavgm"], "strategy.name: privacy.mode=dp_fedavg cannot wrap fedavgm"),
    (["privacy=dp_fedavg", "privacy.accountant=prv"], "privacy.accountant: prv is Opacus's accountant for dp_sgd"),
    (["privacy=dp_fedavg", "privacy.target_epsilon=3"], "privacy.target_epsilon: is only used by privacy.mode=dp_sgd"),
    (["privacy=dp_fedavg", "privacy.clipping=adaptive"],
     "privacy.clipped_count_stddev: 0.5 is too small for noise_multiplier=1 with adaptive clipping"),
    (["privacy.mode=dp_everything"], "privacy.mode: unknown value 'dp_everything'"),
])
def test_bad_privacy_configs_fail_naming_the_key(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        compose_experiment(overrides, tmp_path)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_fedprox_without_proximal_term_is_fine_under_dp_sgd(tmp_path: Path) -> None:
    cfg = compose_experiment(["privacy=dp_sgd", "strategy=fedprox", "strategy.proximal_mu=0"], tmp_path)
    assert cfg.strategy.name == "fedprox" and cfg.privacy.mode == "dp_sgd"


def test_the_cli_rejects_an_unsafe_combination_before_starting_anything(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "fedslm.simulations.run", "privacy=dp_sgd", "strategy=fedprox",
         f"hydra.run.dir={tmp_path}"],
        cwd=CONF_DIR.parent, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(
        "error: strategy.proximal_mu: must be 0 with privacy.mode=dp_sgd")
    assert not (tmp_path / "status.json").exists()
