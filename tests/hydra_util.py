"""Compose the real conf/ tree the way ``fedslm.simulations.run`` does, without running it."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from fedslm.config import ExperimentConfig
from fedslm.simulations.run import experiment_from_hydra

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_experiment(overrides: list[str], output_dir: Path) -> ExperimentConfig:
    """Compose conf/config.yaml with overrides, resolve ${hydra:...}, and check it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.runtime.cwd = str(CONF_DIR.parent)
        HydraConfig.instance().set_config(cfg)
        OmegaConf.set_readonly(cfg, False)
        with open_dict(cfg):
            del cfg["hydra"]
        return experiment_from_hydra(cfg)
