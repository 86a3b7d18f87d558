"""The personalization config group: every option composes; bad values fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedslm.config import PERSONALIZATION_METHODS, ConfigError
from tests.hydra_util import CONF_DIR, compose_experiment


def test_one_conf_file_per_method(tmp_path: Path) -> None:
    assert sorted(p.stem for p in (CONF_DIR / "personalization").glob("*.yaml")) == sorted(PERSONALIZATION_METHODS)
    for method in PERSONALIZATION_METHODS:
        assert compose_experiment([f"personalization={method}"], tmp_path).personalization.method == method
    assert compose_experiment([], tmp_path).personalization.method == "none"


def test_overrides_compose(tmp_path: Path) -> None:
    cfg = compose_experiment(["personalization=finetune", "personalization.finetune_steps=3",
                              f"personalization.state_dir={tmp_path}/state"], tmp_path)
    assert (cfg.personalization.finetune_steps, cfg.personalization.state_dir) == (3, f"{tmp_path}/state")


@pytest.mark.parametrize(("overrides", "message"), [
    (["personalization.method=fedper"],
     "personalization.method: unknown value 'fedper'; expected one of none, local_only, finetune, split, dual"),
    (["personalization=finetune", "personalization.finetune_steps=0"],
     "personalization.finetune_steps: must be >= 1, got 0"),
    (["personalization=local_only", "peft.bias=all"], "personalization.method: local_only needs peft.bias=none"),
    (["personalization.finetune_learning_rate=0"], "personalization.finetune_learning_rate: must be > 0, got 0.0"),
])
def test_bad_values_fail_naming_the_key(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        compose_experiment(overrides, tmp_path)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
