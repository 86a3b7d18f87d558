"""The MLflow Model Registry at the end of a run (``tracking.register``).

The registered model is the global adapter merged into the base, wrapped as a pyfunc that
generates (``fedslm.mlflow_model``; a classify run's: one that returns label and
probability per text), logged under the run's ``model`` artifact and
registered as a new version of ``tracking.model_name``, tagged with the final round's
metrics and the round it comes from. With ``tracking.register_best_by`` that round is the
best one by that metric: ``BestRound`` keeps the best adapter so far in
``<output_dir>/best_adapter/`` after every round (one adapter, only when asked), so it
exists at the end and survives a resumed server.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.common import log

from fedslm.adapters import save_adapter
from fedslm.config import ConfigError, ExperimentConfig
from fedslm.tasks.classify import class_labels

BEST_DIR = "best_adapter"
BEST_FILE = "fedslm-round.json"


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or "perplexity" in metric


class BestRound:
    """Round-end hook: keeps the adapter of the best round so far by ``register_best_by``."""

    def __init__(self, cfg: ExperimentConfig, output_dir: Path, *, base_model: str) -> None:
        self.cfg, self.base_model = cfg, base_model
        self.metric = cfg.tracking.register_best_by
        self.dir = Path(output_dir) / BEST_DIR
        meta = self.dir / BEST_FILE
        self.best = json.loads(meta.read_text()) if meta.is_file() else None

    def better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best["value"] if lower_is_better(self.metric) else value > self.best["value"]

    def __call__(self, rnd: int, arrays: Mapping[str, np.ndarray], metrics: Mapping[str, float]) -> None:
        if self.metric not in metrics:
            raise ConfigError(f"tracking.register_best_by: round {rnd} has no metric "
                              f"{self.metric!r}; round metrics are: {', '.join(sorted(metrics))}")
        value = float(metrics[self.metric])
        if math.isfinite(value) and self.better(value):
            self.best = {"round": rnd, "metric": self.metric, "value": value}
            save_adapter(arrays, self.cfg.peft, base_model=self.base_model, out_dir=self.dir,
                         extra_files={BEST_FILE: json.dumps(self.best, indent=2)})


def best_round_hook(cfg: ExperimentConfig, output_dir: Path, *, base_model: str) -> BestRound | None:
    if not (cfg.tracking.register and cfg.tracking.register_best_by):
        return None
    return BestRound(cfg, output_dir, base_model=base_model)


def with_best_round(on_round_end, best: BestRound | None):
    """The run's round-end hook, followed by ``best`` when there is one."""
    if best is None:
        return on_round_end

    def hook(rnd, arrays, metrics, rows):
        on_round_end(rnd, arrays, metrics, rows)
        best(rnd, {k: v.numpy() for k, v in arrays.items()}, metrics)

    return hook


def chosen_adapter(cfg: ExperimentConfig, output_dir: Path, final_adapter: Path,
                   last_round: int) -> tuple[Path, int]:
    """(adapter dir, round) to register: the best round's when asked, else the final one."""
    if not cfg.tracking.register_best_by:
        return final_adapter, last_round
    meta = Path(output_dir) / BEST_DIR / BEST_FILE
    if not meta.is_file():
        raise ConfigError(f"tracking.register_best_by: no round of this run reported "
                          f"{cfg.tracking.register_best_by!r}, nothing to register")
    return meta.parent, int(json.loads(meta.read_text())["round"])


def register_model(cfg: ExperimentConfig, client, run_id: str, *, adapter_dir: Path,
                   round_: int, final_metrics: Mapping[str, float]) -> dict:
    """Merge, wrap, log and register; returns {name, version, round, source}."""
    from fedslm.classifier import name_labels
    from fedslm.export_formats import save_hf
    from fedslm.inference import assemble_model, merged_model, read_adapter
    from fedslm.mlflow_model import save_classifier_model, save_generative_model

    task = cfg.task.name
    labels = list(class_labels(cfg)) if task == "classify" else []
    shared, peft_cfg, base_path = read_adapter(adapter_dir)
    model, tokenizer = assemble_model(base_path, peft_cfg, method=cfg.personalization.method,
                                      dtype=cfg.model.dtype, shared=shared, seed=cfg.training.seed,
                                      task=task, num_labels=len(labels))
    merged = merged_model(model)
    name_labels(merged.config, labels)
    name = cfg.tracking.model_name
    with tempfile.TemporaryDirectory(prefix="fedslm-register-") as tmp:
        merged_dir = save_hf(merged, tokenizer, Path(tmp) / "merged", task=task)
        mlflow_dir = (save_classifier_model(Path(tmp) / "model", merged_dir, labels=labels,
                                            seq_len=cfg.training.seq_len) if task == "classify"
                      else save_generative_model(Path(tmp) / "model", merged_dir, task=task))
        client.log_artifacts(run_id, str(mlflow_dir), "model")
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    tags = {k: f"{float(v):.6g}" for k, v in final_metrics.items() if k != "round"}
    tags.update({"fedslm.round": str(round_),
                 "fedslm.register_best_by": cfg.tracking.register_best_by or "last round"})
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    version = client.create_model_version(name, source, run_id=run_id, tags=tags)
    log(INFO, "registered %s version %s (round %d) from %s", name, version.version, round_, source)
    return {"name": name, "version": int(version.version), "round": round_, "source": source}


def register_run(cfg: ExperimentConfig, tracker, output_dir: Path, final_adapter: Path,
                 rounds: list[dict]) -> dict:
    """End-of-run registration. A registry failure does not fail a finished run: it is
    logged, tagged on the run (``fedslm.register_error``) and returned as ``{"error": ...}``."""
    from logging import WARNING

    last = rounds[-1] if rounds else {}
    try:
        adapter_dir, round_ = chosen_adapter(cfg, output_dir, final_adapter, int(last.get("round", 0)))
        return register_model(cfg, tracker.client, tracker.run_id, adapter_dir=adapter_dir,
                              round_=round_, final_metrics=last)
    except Exception as err:  # noqa: BLE001 - reported, not raised (see docstring)
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]
        log(WARNING, "model registration failed: %s", message)
        tracker.set_tag("fedslm.register_error", message)
        return {"error": message}
