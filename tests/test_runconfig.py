"""The one flat run-config conversion, and pyproject's table kept equal to the schema."""

from __future__ import annotations

import tomllib

from fedslm.config import ExperimentConfig
from fedslm.runconfig import PROJECT_ROOT, from_run_config, to_run_config


def test_round_trip_is_exact() -> None:
    cfg = ExperimentConfig.from_dict({
        "peft": {"r": 4, "target_modules": ["q_proj", "k_proj"]},
        "strategy": {"name": "fedprox", "proximal_mu": 0.5},
        "output_dir": "/abs/out",
    })
    flat = to_run_config(cfg)
    assert flat["peft.target_modules"] == "q_proj,k_proj"
    assert flat["peft.r"] == 4 and flat["strategy.proximal_mu"] == 0.5
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert from_run_config(flat) == cfg


def test_pyproject_declares_exactly_the_schema_keys_and_defaults() -> None:
    table = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == to_run_config(ExperimentConfig.from_dict({})), (
        "regenerate with: python -m fedslm.runconfig --write-pyproject")
