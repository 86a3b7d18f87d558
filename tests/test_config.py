"""Every config in conf/ composes and validates; bad values fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedslm.config import ConfigError, ExperimentConfig
from tests.hydra_util import CONF_DIR, compose_experiment

GROUP_OPTIONS = sorted(
    (group.name, option.stem)
    for group in CONF_DIR.iterdir() if group.is_dir()
    for option in group.glob("*.yaml")
)


def test_default_config_composes_to_the_schema_defaults(tmp_path: Path) -> None:
    cfg = compose_experiment([], tmp_path)
    defaults = ExperimentConfig.from_dict({})
    assert cfg.output_dir == str(tmp_path)
    assert cfg.peft == defaults.peft
    assert cfg.training == defaults.training
    assert cfg.strategy == defaults.strategy
    assert cfg.federation.num_clients == 10 and cfg.federation.num_rounds == 5
    assert cfg.tracking.uri == f"sqlite:///{CONF_DIR.parent}/outputs/mlflow.db"


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes_and_validates(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "text_files"):
        overrides.append(f"data.path={tmp_path}")
    if (group, option) == ("data", "hf"):
        overrides.append("data.hf_name=some/dataset")
    if (group, option) == ("attack", "label_flip"):
        overrides.append("task=classify")  # label_flip alone is refused (needs labels)
    cfg = compose_experiment(overrides, tmp_path)
    if group == "search":  # Hydra's sweeper only: the experiment itself is the default
        assert cfg == compose_experiment([], tmp_path)
        return
    assert getattr(cfg, group) is not None
    if group == "strategy":
        assert cfg.strategy.name == option


def test_issue_example_overrides_compose(tmp_path: Path) -> None:
    cfg = compose_experiment(
        ["strategy=fedprox", "strategy.proximal_mu=0.01", "federation.num_clients=20",
         "peft.r=16", "data=text_files", f"data.path={tmp_path}",
         "model.name_or_path=HuggingFaceTB/SmolLM2-135M"], tmp_path)
    assert (cfg.strategy.name, cfg.strategy.proximal_mu) == ("fedprox", 0.01)
    assert (cfg.federation.num_clients, cfg.peft.r) == (20, 16)
    assert cfg.data.source == "text_files" and cfg.data.path == str(tmp_path)
    assert cfg.model.name_or_path == "HuggingFaceTB/SmolLM2-135M"


@pytest.mark.parametrize(("override", "message"), [
    ("peft.r=0", "peft.r: must be > 0, got 0"),
    ("peft.r=-3", "peft.r: must be > 0, got -3"),
    ("strategy.fraction_train=0", "strategy.fraction_train: must be in (0, 1], got 0.0"),
    ("strategy.fraction_evaluate=1.5",
     "strategy.fraction_evaluate: must be in [0, 1] (0: no federated evaluation), got 1.5"),
    ("strategy.name=fedbogus", "strategy.name: unknown value 'fedbogus'"),
    ("model.dtype=float8", "model.dtype: unknown value 'float8'"),
    ("training.batch_size=0", "training.batch_size: must be >= 1, got 0"),
    ("training.learning_rate=-1", "training.learning_rate: must be > 0, got -1.0"),
    ("federation.num_clients=1", "strategy.min_train_clients: 2 exceeds federation.num_clients=1"),
    ("data=text_files", "data.path: is required for data.source=text_files"),
    ("peft.r=abc", "peft.r: expected an integer, got 'abc'"),
    ("strategy.proximal_mu=0.1", "strategy.proximal_mu: is only used by fedprox, not fedavg"),
    ("data.heterogeneity=2", "data.heterogeneity: must be in [0, 1], got 2.0"),
])
def test_bad_values_fail_naming_the_key(override: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        compose_experiment([override], tmp_path)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


REGISTER = {"register": True, "model_name": "m"}


@pytest.mark.parametrize(("sections", "message"), [
    ({"strategy": {"fraction_evaluate": 0.0}, "personalization": {"method": "finetune"}},
     "strategy.fraction_evaluate: 0 turns federated evaluation off, where "
     "personalization.method=finetune measures each client's personal model (and fine-tunes it)"),
    ({"strategy": {"fraction_evaluate": 0.0}, "personalization": {"method": "dual"}},
     "strategy.fraction_evaluate: 0 turns federated evaluation off, where "
     "personalization.method=dual measures each client's personal model"),
    ({"strategy": {"fraction_evaluate": 0.0}, "tracking": {**REGISTER, "register_best_by": "eval_loss"}},
     "tracking.register_best_by: eval_loss is a federated evaluation metric, and "
     "strategy.fraction_evaluate=0 turns federated evaluation off"),
    ({"training": {"central_eval": False}, "tracking": {**REGISTER, "register_best_by": "central_loss"}},
     "tracking.register_best_by: central_loss is measured by the server's own evaluation, and "
     "training.central_eval=false turns it off"),
])
def test_a_metric_the_run_never_computes_is_refused_naming_both_keys(sections: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict(sections)
    assert str(err.value) == message


def test_fraction_evaluate_zero_turns_federated_evaluation_off_as_in_flower() -> None:
    from fedslm.server.strategy import build_strategy

    # its minimum no longer applies: 5 evaluating clients of 3 is not an error at 0
    cfg = ExperimentConfig.from_dict({"federation": {"num_clients": 3},
                                      "strategy": {"fraction_evaluate": 0.0, "min_train_clients": 1,
                                                   "min_evaluate_clients": 5},
                                      "tracking": {**REGISTER, "register_best_by": "central_loss"}})
    strategy = build_strategy(cfg)
    assert (strategy.min_evaluate_nodes, strategy.min_available_nodes) == (0, 1)
    assert list(strategy.configure_evaluate(1, None, None, None)) == []  # no grid asked


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"^peft\.rank: unknown key$"):
        ExperimentConfig.from_dict({"peft": {"rank": 8}})


def test_lists_accept_comma_strings() -> None:
    cfg = ExperimentConfig.from_dict({"peft": {"target_modules": "q_proj, k_proj,v_proj"}})
    assert cfg.peft.target_modules == ["q_proj", "k_proj", "v_proj"]
