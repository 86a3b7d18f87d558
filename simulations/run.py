"""Hydra entry point: validate -> flatten -> run on Flower's engine -> report.

    python -m fedslm.simulations.run                       # embedded default (tiny SLM, synthetic data)
    python -m fedslm.simulations.run strategy=fedprox peft.r=16 federation.num_clients=20
    python -m fedslm.simulations.run -m peft.r=4,8,16      # a sweep: one MLflow run per job
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

# Light imports only: the config is checked before torch, transformers and Flower load, so
# a bad value fails in about a second (the engine's modules are imported in ``run``).
from fedslm.config import ConfigError, ExperimentConfig
from fedslm.data.core import DataError
from fedslm.errors import LaunchError, ModelError
from fedslm.quiet import quiet_process
from fedslm.shared_data import register_resolver
from fedslm.simulations.search import check_direction, objective
from fedslm.simulations.report import personal_table, summary_table, where_to_look

EXPECTED_ERRORS = (ConfigError, DataError, ModelError, LaunchError)

# Every schema key with its default, as the first layer of conf/config.yaml: any key can
# be overridden whatever group option is chosen, and group files state only what differs.
# A plain dict (not the dataclass) so values are checked by fedslm.config alone.
ConfigStore.instance().store(name="fedslm_schema", node=ExperimentConfig().to_dict())
# ${fedslm.shared_data:REL} in conf/data/*.yaml: anchored on the project root, not the cwd
register_resolver()


def experiment_from_hydra(hcfg: DictConfig) -> ExperimentConfig:
    """The one conversion from Hydra's composed config to the checked schema."""
    return ExperimentConfig.from_dict(OmegaConf.to_container(hcfg, resolve=True))


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Paths the engine's processes read, made absolute (their working dir is not ours);
    a resumed run continues in the interrupted run's own output dir."""
    fed = cfg.federation
    if cfg.strategy.root_data:  # FLTrust's root records, read by the ServerApp
        root = str(Path(cfg.strategy.root_data).expanduser().resolve())
        cfg = dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, root_data=root))
    if fed.root_certificates:
        fed = dataclasses.replace(fed, root_certificates=str(Path(fed.root_certificates).resolve()))
    if fed.resume_from:
        fed = dataclasses.replace(fed, resume_from=str(Path(fed.resume_from).resolve()))
        return dataclasses.replace(cfg, federation=fed, output_dir=fed.resume_from)
    return dataclasses.replace(cfg, federation=fed)


def run(cfg: ExperimentConfig, *, warm_engine: bool = False) -> dict:
    """One job; ``warm_engine``: on the SuperLink shared by the jobs of a sweep."""
    from fedslm.simulations.preflight import check_tracking, hints, preflight, preflight_deployment

    start = time.monotonic()
    quiet_process(cfg.verbose)
    cfg = absolute_paths(cfg)
    print(f"[fedslm] preparing data and base model ({cfg.model.name_or_path}) ...", flush=True)
    check_tracking(cfg)
    done_rounds = preflight_deployment(cfg)
    preflight(cfg)
    for hint in hints(cfg):
        print(f"[fedslm] hint: {hint}", flush=True)
    if done_rounds:
        print(f"[fedslm] resuming {cfg.output_dir} after round {done_rounds}", flush=True)
    print(f"[fedslm] {cfg.federation.num_clients} clients x {cfg.federation.num_rounds} rounds, "
          f"strategy {cfg.strategy.name}, aggregation {cfg.aggregation.name}, LoRA r={cfg.peft.r}"
          f"{' (clients ' + cfg.peft.ranks + ')' if cfg.peft.ranks else ''}, engine {cfg.federation.engine}, "
          f"personalization {cfg.personalization.method}",
          flush=True)
    from fedslm.simulations.launch import run_on_remote, run_on_simulation  # Flower's CLI: after the checks

    if cfg.federation.engine == "remote":
        summary = run_on_remote(cfg)
    elif warm_engine:
        from fedslm.simulations.warm_engine import ENGINE, install_sigterm_handler

        install_sigterm_handler()
        summary = run_on_simulation(cfg, warm=ENGINE)
    else:
        summary = run_on_simulation(cfg)
    from fedslm.tasks import get_task

    print("\n" + summary_table(summary["rounds"], get_task(cfg.task.name).report_keys))
    if cfg.personalization.method != "none":
        print(f"\nPersonalization ({cfg.personalization.method}), means over clients:")
        print(personal_table(summary["rounds"]))
    print(f"\nWall time: {time.monotonic() - start:.1f}s")
    print(where_to_look(summary), flush=True)
    return summary


def in_a_sweep() -> bool:
    """A job of ``-m``: its sweep's jobs share one SuperLink."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweeper_direction() -> object | None:
    """The Optuna sweeper's direction when this job is one of its trials, else None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().sweeper
    return sweeper.get("direction") if "optuna" in str(sweeper.get("_target_", "")) else None


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(hcfg: DictConfig) -> float:
    """Runs the job; returns its objective (the task's headline metric, for sweepers)."""
    try:
        cfg = experiment_from_hydra(hcfg)
        if (direction := sweeper_direction()) is not None:
            check_direction(direction, cfg.task.name)
        return objective(run(cfg, warm_engine=in_a_sweep()), cfg.task.name)
    except EXPECTED_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def interruptible() -> None:
    """Ctrl-C (SIGINT) always stops the launcher, which then stops what it started: a
    disposition inherited as ignored or a signal inherited as blocked (a parent's choice,
    kept across exec) would otherwise leave the engine running until it ends."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def entry() -> None:
    """``python -m fedslm.simulations.run`` and the ``fedslm-sim`` console script."""
    interruptible()
    main()


if __name__ == "__main__":
    entry()
