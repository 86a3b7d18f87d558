"""One federated experiment on the server: config -> model -> strategy -> rounds -> save.

Numbered steps, like Flower baselines. Everything a user reads afterwards lands in the
run's output dir and in MLflow: the resolved config, per-round and per-client tables,
plots, and the final global adapter in standard PEFT format.
"""

from __future__ import annotations

import csv
import json
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedslm.adapters import (adapter_arrays, load_adapter_arrays, reset_lora, reset_to_init,
                             save_adapter, to_array_record)
from fedslm.config import ExperimentConfig
from fedslm.device import autocast, model_device
from fedslm.backdoor import backdoor_success
from fedslm.data import central_test_texts
from fedslm.data.federated import data_notes
from fedslm.runconfig import to_run_config
from fedslm.runtime import client_split, encoded, experiment_model, model_path
from fedslm.tasks import get_task
from fedslm.server.checkpoint import (
    StateHook,
    checkpoint_path,
    make_checkpoint,
    resume_state,
    save_checkpoint,
)
from fedslm.server.personalization import PersonalizationReport
from fedslm.server.plots import plot_confusion, plot_rounds
from fedslm.server.population import population_grid
from fedslm.server.privacy import ServerPrivacyState, resumed_state
from fedslm.server.privacy_rounds import setup_privacy
from fedslm.server.registry import best_round_hook, register_run, with_best_round
from fedslm.server.rounds import CentralEval, History, RoundPlan, freeze_startup_objects, run_rounds
from fedslm.server.strategy import build_strategy
from fedslm.server.tracking import NoTracker, Tracker
from fedslm.server.lora_aggregation import rank_state_hook, with_aggregation
from fedslm.server.secagg_round import setup_secure
from fedslm.skeleton import has_skeleton, skeleton_model


def initial_adapter(cfg: ExperimentConfig) -> dict[str, np.ndarray]:
    """A freshly initialized LoRA adapter (PEFT's own init: A random, B zero),
    reproducible from ``training.seed``; only its shared (travelling) tensors."""
    if has_skeleton(cfg):  # no base weights in the ServerApp for this
        return adapter_arrays(skeleton_model(cfg))
    model, _ = experiment_model(cfg)
    reset_lora(model, seed=cfg.training.seed)
    return adapter_arrays(model)


def fixed_adapter(cfg: ExperimentConfig) -> dict[str, np.ndarray]:
    """Adapter tensors that never travel but belong in the saved adapter (FFA-LoRA's A,
    the same seeded init on every side); empty for other aggregation rules."""
    model = skeleton_model(cfg) if has_skeleton(cfg) else experiment_model(cfg)[0]
    return adapter_arrays(model, "fixed")


ExamplesSink = Callable[[int, list[dict[str, str]]], None]


def make_central_eval(cfg: ExperimentConfig, texts: tuple[str, ...], *,
                      examples: ExamplesSink | None = None) -> CentralEval | None:
    """Evaluate the global adapter on held-out records no client trains on, with the
    task's own metrics (``central_*``); generating tasks also hand a few (prompt,
    reference, generated) examples of this server-side split to ``examples``. With
    ``attack.kind=backdoor``, ``central_backdoor_success`` (``fedslm.backdoor``)."""
    if not cfg.training.central_eval or not texts:
        return None
    model, tokenizer = experiment_model(cfg)
    task = get_task(cfg.task.name)
    tensors = encoded(cfg, texts, tokenizer)
    names = class_names(cfg)

    def central_eval(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        load_adapter_arrays(model, {k: v.numpy() for k, v in arrays.items()})
        reset_to_init(model, "personal", seed=cfg.training.seed)  # the global model alone
        with autocast(model_device(model), cfg.training.precision):
            stats = task.evaluate(model, tensors, batch_size=cfg.training.batch_size,
                                  max_batches=cfg.training.eval_max_batches)
            if cfg.task.eval_generations > 0:
                generated, shown = task.generation_metrics(model, texts, tokenizer, cfg)
                stats.update(generated)
            if cfg.attack.kind == "backdoor":  # the simulated attack's success on clean prompts
                stats["backdoor_success"] = backdoor_success(
                    model, tokenizer, texts, task=cfg.task.name, trigger=cfg.attack.trigger,
                    target=cfg.attack.target, seq_len=cfg.training.seq_len)
        if cfg.task.eval_generations > 0 and examples is not None and shown:
            examples(server_round, shown[: cfg.task.logged_examples])
        metrics = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))
                   and k not in ("num-examples", "num-tokens", "generated", "rouge_l_sum",
                                 "exact_match_sum")}
        metrics.update(task.pooled([stats], names) if names is not None else task.pooled([stats]))
        return {f"central_{k}": v for k, v in metrics.items()}

    return central_eval


def partition_train_sizes(cfg: ExperimentConfig) -> Mapping[int, int] | None:
    """Simulation: each partition's train example count exactly as its client counts it
    (rows of its encoded train split, audit canaries included; one row per document with
    ``privacy.unit=document``), which caps its averaging weight
    (``fedslm.server.screening.known_size_cap``); None outside simulation.
    Counted per partition on first use: a large federation's server encodes only the
    partitions that reply, not all of them at start-up."""
    if cfg.federation.engine != "simulation":
        return None
    return _PartitionSizes(cfg, "train")


def partition_test_sizes(cfg: ExperimentConfig) -> Mapping[int, int] | None:
    """Simulation: each partition's evaluate example count as its client counts it (rows
    of its encoded test split, at most ``training.eval_max_batches`` batches), which caps
    the weight of its evaluate metrics in the round's means; None outside simulation."""
    if cfg.federation.engine != "simulation":
        return None
    return _PartitionSizes(cfg, "test")


class _PartitionSizes(Mapping[int, int]):
    def __init__(self, cfg: ExperimentConfig, split: str) -> None:
        self.cfg, self.split, self._sizes = cfg, split, {}

    def __len__(self) -> int:
        return self.cfg.federation.num_clients

    def __iter__(self):
        return iter(range(len(self)))

    def __getitem__(self, pid: int) -> int:
        if not (isinstance(pid, int) and 0 <= pid < len(self)):
            raise KeyError(pid)
        if pid not in self._sizes:
            self._sizes[pid] = self._count(pid)
        return self._sizes[pid]

    def _count(self, pid: int) -> int:
        from fedslm.audit.canaries import with_canaries

        cfg = self.cfg
        _, tokenizer = experiment_model(cfg)
        split = client_split(cfg.data, num_clients=len(self), partition_id=pid, task=cfg.task.name)
        if self.split == "test":
            rows = int(encoded(cfg, split.test, tokenizer)[0].shape[0])
            limit = cfg.training.eval_max_batches * cfg.training.batch_size
            return min(rows, limit) if limit else rows
        texts = with_canaries(cfg, pid, split).train
        if cfg.privacy.unit == "document":  # as fedslm.client.records.client_tensors
            from fedslm.tasks.causal_lm import document_blocks

            return int(document_blocks(texts, tokenizer, seq_len=cfg.training.seq_len).shape[0])
        return int(encoded(cfg, texts, tokenizer)[0].shape[0])


def class_names(cfg: ExperimentConfig) -> list[str] | None:
    """Class names for per-class metrics (classification only)."""
    if cfg.task.name != "classify":
        return None
    from fedslm.tasks.classify import label_names

    return label_names(cfg)


def examples_writer(output_dir: Path, tracker: Tracker | NoTracker) -> ExamplesSink:
    """Each round's generated examples as ``examples/round_NNN.csv`` (and in MLflow)."""

    def write(server_round: int, rows: list[dict[str, str]]) -> None:
        path = output_dir / "examples" / f"round_{server_round:03d}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["prompt", "reference", "generated"])
            writer.writeheader()
            writer.writerows(rows)
        tracker.log_artifact(path, "examples")

    return write


def make_tracker(cfg: ExperimentConfig, output_dir: Path) -> Tracker | NoTracker:
    if not cfg.tracking.enabled:
        return NoTracker()
    default_uri = "sqlite:///" + str((output_dir.parent / "mlflow.db").resolve())
    return Tracker(cfg.tracking, default_uri=default_uri)


def run_experiment(grid: Grid, cfg: ExperimentConfig, output_dir: Path) -> dict[str, Any]:
    """Run every round, write outputs, return the summary that is also saved as JSON."""
    output_dir.mkdir(parents=True, exist_ok=True)
    fed = cfg.federation  # many virtual clients on a few SuperNodes, if asked or needed
    grid = population_grid(grid, num_clients=fed.num_clients, supernodes=fed.supernodes,
                           engine=fed.engine)
    # 1. threads and reproducibility. In simulation the ServerApp shares the machine (in
    # Flower 1.41 even the process) with the simulated clients: torch's default of one
    # thread per core oversubscribes it, and central evaluation of the tiny model took
    # 10x longer with 2 threads than with 1 on a busy 2-core machine.
    if cfg.federation.engine == "simulation":
        torch.set_num_threads(cfg.federation.client_num_cpus)
    # Flower samples nodes with the `random` module
    random.seed(cfg.training.seed)
    np.random.seed(cfg.training.seed)
    torch.manual_seed(cfg.training.seed)
    # 2. model and the first global adapter
    base_path = model_path(cfg.model, cfg.data.seed)
    arrays = to_array_record(initial_adapter(cfg))
    # 3. data the server may see: only the central held-out split
    central_texts = central_test_texts(cfg.data, num_clients=cfg.federation.num_clients,
                                       task=cfg.task.name)
    # 4. strategy (wrapped for user-level DP), tracking, round plan; a resumed run
    # continues its checkpoint
    strategy, privacy = setup_privacy(cfg, with_aggregation(cfg, build_strategy(cfg)), output_dir)
    # Server state beyond the strategy that must survive a restart registers here.
    state_hooks: list[StateHook] = [h for h in (privacy_state_hook(strategy),
                                                privacy and privacy.state_hook(),
                                                rank_state_hook(strategy)) if h]
    resumed = resume_state(cfg, strategy, state_hooks)
    if resumed is not None:
        arrays = to_array_record(resumed.arrays)
    tracker = make_tracker(cfg, output_dir)
    flat = to_run_config(cfg)
    run_id = tracker.start(flat, run_id=resumed.mlflow_run_id if resumed else None,
                           tags={"fedslm.output_dir": str(output_dir)}, default_name=run_name(cfg))
    (output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    tracker.log_artifact(output_dir / "config.json")
    personal_report = PersonalizationReport(output_dir, tracker)
    history = resumed.history if resumed is not None else History()
    plan = RoundPlan(num_rounds=cfg.federation.num_rounds, timeout=cfg.federation.round_timeout,
                     central_eval=make_central_eval(cfg, central_texts,
                                                    examples=examples_writer(output_dir, tracker)),
                     privacy=privacy, task=get_task(cfg.task.name), class_names=class_names(cfg),
                     round_metrics=personal_report.round_metrics,
                     initial_evaluation=cfg.federation.initial_evaluation,
                     robust=cfg.robust, compression=cfg.compression.method,
                     known_sizes=partition_train_sizes(cfg),
                     known_test_sizes=partition_test_sizes(cfg),
                     secure=setup_secure(cfg, strategy),
                     on_round_end=with_best_round(
                         round_end_saver(cfg, output_dir, strategy, history, tracker,
                                         run_id=run_id, hooks=state_hooks),
                         best_round_hook(cfg, output_dir, base_model=base_path)))
    freeze_startup_objects()  # full garbage collections skip the ~10^5 objects above
    try:
        # 5. rounds
        arrays, history = run_rounds(
            grid, strategy, plan, arrays, history=history,
            first_round=resumed.round + 1 if resumed is not None else 1,
            log_metrics=lambda metrics, step: tracker.log_metrics(metrics, step=step),
        )
        # 6. save: adapter (PEFT format), tables, plot, summary
        task = get_task(cfg.task.name)
        model, _ = experiment_model(cfg)
        adapter_dir = save_adapter({k: v.numpy() for k, v in arrays.items()} | fixed_adapter(cfg),
                                   cfg.peft, base_model=base_path, out_dir=output_dir / "adapter",
                                   task_type=task.peft_task_type,
                                   model_type=getattr(model.config, "model_type", None))
        write_tables(history, output_dir)
        plot_rounds(history.rounds, output_dir / "curves.png", metrics=task.report_keys)
        plots = ["curves.png"]
        if cfg.task.name == "classify" and plot_confusion(history.clients, class_names(cfg) or [],
                                                          output_dir / "confusion.png"):
            plots.append("confusion.png")
        for name in ("rounds.csv", "clients.csv", *plots):
            tracker.log_artifact(output_dir / name)
        tracker.log_artifact(adapter_dir, "adapter")
        personal_report.finish()
        if cfg.privacy.audit:  # empirical privacy audit + privacy report (server/audit.py)
            from fedslm.server.audit import audit_and_report  # sklearn: only runs that audit load it

            audit_and_report(cfg, output_dir, {k: v.numpy() for k, v in arrays.items()}, tracker)
        registered = (register_run(cfg, tracker, output_dir, adapter_dir, history.rounds)
                      if cfg.tracking.register else None)
        summary = {"status": "ok", "task": cfg.task.name, "rounds": history.rounds,
                   "data_notes": list(data_notes(cfg.data, num_clients=cfg.federation.num_clients,
                                                 task=cfg.task.name)),
                   "mlflow_uri": tracker.uri,
                   "mlflow_run_id": run_id, "mlflow_experiment_id": tracker.experiment_id,
                   "adapter_dir": str(adapter_dir), "base_model": base_path,
                   "output_dir": str(output_dir)}
        if registered is not None:
            summary["registered"] = registered
        if privacy is not None:
            summary["privacy"] = privacy.summary()
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        tracker.end("FINISHED")
        return summary
    except BaseException:
        write_tables(history, output_dir)
        tracker.end("FAILED")
        raise


def run_name(cfg: ExperimentConfig) -> str:
    """A readable MLflow run name that tells sweep jobs apart (MLflow's own random names
    would repeat: the server seeds ``random`` for Flower's client sampling)."""
    parts = ([cfg.task.name] if cfg.task.name != "causal_lm" else []) + [cfg.strategy.name, f"r{cfg.peft.r}"]
    if cfg.privacy.mode != "none":
        parts.append(f"{cfg.privacy.mode}-z{cfg.privacy.noise_multiplier:g}")
    if cfg.personalization.method != "none":
        parts.append(cfg.personalization.method)
    if cfg.compression.method != "none":
        parts.append(cfg.compression.method)
    return "-".join(parts + [time.strftime("%m%d-%H%M%S")])


def privacy_state_hook(strategy: Any) -> StateHook | None:
    """The user-level privacy ledger (DP-FedAvg) in every checkpoint. On resume the
    file's ledger continues the checkpoint's or the resume is refused
    (``fedslm.server.privacy.resumed_state``)."""
    if not isinstance(getattr(strategy, "state", None), ServerPrivacyState):
        return None

    def load(data: dict[str, Any]) -> None:
        strategy.state = resumed_state(strategy.state, data, path=strategy.state_path)

    return StateHook("privacy_accountant", lambda: strategy.state.to_dict(), load)


def round_end_saver(cfg: ExperimentConfig, output_dir: Path, strategy: Any, history: History,
                    tracker: Tracker | NoTracker, *, run_id: str, hooks: list[StateHook]):
    """After each round: checkpoint (atomic), tables on disk and in MLflow, and a tag
    naming the clients that dropped, so a crash loses at most the round in progress."""

    def on_round_end(rnd: int, arrays: ArrayRecord, metrics: dict, rows: list[dict]) -> None:
        adapter = {k: v.numpy() for k, v in arrays.items()}
        save_checkpoint(checkpoint_path(output_dir),
                        make_checkpoint(rnd, adapter, strategy, history, mlflow_run_id=run_id,
                                        cfg=cfg, hooks=hooks))
        write_tables(history, output_dir)
        for name in ("rounds.csv", "clients.csv"):
            tracker.log_artifact(output_dir / name)
        dropped = [f"{r['phase']}:{r['node_id']}:{r['status']}" for r in rows
                   if r.get("status", "ok") != "ok"]
        if dropped:
            tracker.set_tag(f"dropped.round_{rnd:03d}", " ".join(dropped))

    return on_round_end


def write_tables(history: History, output_dir: Path) -> None:
    """rounds.csv (one row per round) and clients.csv (one row per client per phase)."""
    for name, rows in (("rounds.csv", history.rounds), ("clients.csv", history.clients)):
        first = ("round", "phase", "node_id", "partition-id")
        columns = sorted({k for r in rows for k in r}, key=lambda k: (k not in first, k))
        with open(output_dir / name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
