"""What ``--run`` / ``--client`` / ``--personal`` name, resolved to the tensors of one model.

The one CLI shape of ``fedslm.simulations.generate`` and ``fedslm.simulations.export`` (and ``fedslm``):

* ``--run`` is a finished run's output dir (``adapter/`` + ``config.json``) or an MLflow run
  id (its ``fedslm.output_dir`` tag, or its logged ``adapter`` and ``config.json``);
* ``--client N`` is that run's simulated client N (``<output dir>/clients/N``);
* ``--personal DIR`` is a client's state dir (a device's ``--state-dir``), with or without
  ``--run``.

Also the held-out texts a model is scored on: the central test split for the global
model, the client's own test split for a personal one, scored exactly as clients score.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedslm.client.local_model import personal_parts
from fedslm.config import ConfigError, ExperimentConfig, PeftConfig
from fedslm.inference import InferenceError, assemble_model, read_adapter

MLFLOW_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class ModelSpec:
    """One model: base + the adapter tensors of the global or a personal model."""

    label: str  # "global" or "client N" / "personal <dir>"
    base_path: str
    peft_cfg: PeftConfig
    method: str
    shared: Mapping[str, np.ndarray] | None
    personal: Mapping[str, np.ndarray] | None
    cfg: ExperimentConfig | None  # the run's config (None: a device state dir alone)
    partition_id: int | None  # whose test split scores a personal model
    run_dir: Path | None
    task: str = "causal_lm"  # the task the model was trained for
    labels: tuple[str, ...] = ()  # classify: class names in head order

    @property
    def seq_len(self) -> int:
        return self.cfg.training.seq_len if self.cfg else 128

    def build(self, device: str = "cpu"):
        seed = self.cfg.training.seed if self.cfg else 0
        dtype = self.cfg.model.dtype if self.cfg else "float32"
        return assemble_model(self.base_path, self.peft_cfg, method=self.method, dtype=dtype,
                              shared=self.shared, personal=self.personal, seed=seed,
                              task=self.task, num_labels=len(self.labels), device=device)


def run_dir_of(run: str, *, tracking_uri: str = "") -> Path:
    """An output dir as given, or the one an MLflow run id points to (downloaded if needed)."""
    path = Path(run).expanduser()
    if path.is_dir():
        return path
    if not MLFLOW_RUN_ID.match(run):
        raise InferenceError(f"--run: {run} is neither an output dir nor an MLflow run id")
    import mlflow

    uri = tracking_uri or f"sqlite:///{Path('outputs/mlflow.db').resolve()}"
    try:
        tags = mlflow.MlflowClient(tracking_uri=uri).get_run(run).data.tags
    except Exception as err:  # noqa: BLE001 - any failure means: no such run there
        raise InferenceError(f"--run: no MLflow run {run} in {uri} ({type(err).__name__})") from None
    local = Path(tags.get("fedslm.output_dir", ""))
    if tags.get("fedslm.output_dir") and local.is_dir():
        return local
    dst = Path(tempfile.mkdtemp(prefix="fedslm-run-"))
    for artifact in ("config.json", "adapter"):
        try:
            mlflow.artifacts.download_artifacts(run_id=run, artifact_path=artifact,
                                                dst_path=str(dst), tracking_uri=uri)
        except Exception:  # noqa: BLE001
            raise InferenceError(f"--run: MLflow run {run} has no logged {artifact}") from None
    return dst


def read_run(run_dir: Path) -> ExperimentConfig:
    config = run_dir / "config.json"
    if not config.is_file():
        raise InferenceError(f"--run: {run_dir} has no config.json (not a run's output dir)")
    if not (run_dir / "adapter").is_dir():
        raise InferenceError(f"--run: {run_dir} has no adapter/ (the run did not finish)")
    try:
        return ExperimentConfig.from_dict(json.loads(config.read_text()))
    except (ConfigError, ValueError) as err:
        raise InferenceError(f"--run: {config}: {err}") from None


def resolve(*, run: str = "", client: int | None = None, personal: str = "",
            tracking_uri: str = "") -> ModelSpec:
    """The model the flags name; one-line InferenceError for anything unusable."""
    if client is not None and personal:
        raise InferenceError("--client and --personal: give one of them")
    if not run:
        if not personal:
            raise InferenceError("--run: required (or --personal <state dir> for a device's model)")
        parts = personal_parts(Path(personal))
        return ModelSpec(label=f"personal {parts.client_dir}", base_path=parts.base_path,
                         peft_cfg=parts.peft_cfg, method=parts.method, shared=parts.shared,
                         personal=parts.personal, cfg=None, partition_id=None, run_dir=None,
                         task=parts.task, labels=parts.labels)
    run_dir = run_dir_of(run, tracking_uri=tracking_uri)
    cfg = read_run(run_dir)
    shared, peft_cfg, base_path = read_adapter(run_dir / "adapter")
    method = cfg.personalization.method
    if not Path(base_path).is_dir():  # e.g. downloaded from MLflow on another machine
        from fedslm.runtime import model_path

        base_path = model_path(cfg.model, cfg.data.seed)
    task, labels = cfg.task.name, _labels(cfg)
    if client is None and not personal:
        return ModelSpec(label="global", base_path=base_path, peft_cfg=peft_cfg, method=method,
                         shared=shared, personal=None, cfg=cfg, partition_id=None, run_dir=run_dir,
                         task=task, labels=labels)
    if method == "none":
        raise InferenceError(f"--run: {run_dir} was trained without personalization; "
                             "it has only the global model")
    state_base = Path(cfg.personalization.state_dir or run_dir / "clients").expanduser()
    where = state_base / str(client) if client is not None else Path(personal)
    if client is not None and not where.is_dir():
        raise InferenceError(f"--client: {where} does not exist (no client {client} in this run)")
    parts = personal_parts(where, method=method, shared=shared)
    partition = client if client is not None else _partition_of(parts.client_dir)
    return ModelSpec(label=f"client {partition}" if partition is not None else f"personal {where}",
                     base_path=base_path, peft_cfg=peft_cfg, method=method, shared=shared,
                     personal=parts.personal, cfg=cfg, partition_id=partition, run_dir=run_dir,
                     task=task, labels=labels)


def _labels(cfg: ExperimentConfig) -> tuple[str, ...]:
    """A classify run's class names in head order (``fedslm.tasks.classify``); () otherwise."""
    if cfg.task.name != "classify":
        return ()
    from fedslm.tasks.classify import class_labels

    return class_labels(cfg)


def _partition_of(client_dir: Path) -> int | None:
    return int(client_dir.name) if client_dir.name.isdigit() else None


def eval_texts(spec: ModelSpec) -> tuple[str, ...]:
    """Central test split (global model) or the client's own test split (personal)."""
    if spec.cfg is None:
        return ()
    if spec.partition_id is not None:
        from fedslm.client.task import client_texts

        return tuple(client_texts(spec.cfg, spec.partition_id, "test"))
    from fedslm.data import central_test_texts

    extra = {"task": "classify"} if spec.task == "classify" else {}  # labelled records
    return tuple(central_test_texts(spec.cfg.data, num_clients=spec.cfg.federation.num_clients, **extra))


def score(spec: ModelSpec, model, tokenizer, texts: tuple[str, ...]) -> dict[str, float] | None:
    """Loss / perplexity / next-token accuracy, with the client evaluation's own settings;
    a classify model: loss, accuracy, macro precision / recall / F1 (``classify_logits``)."""
    if not texts or spec.cfg is None:
        return None
    if spec.task == "classify":
        from fedslm.classifier import quality

        return quality(*classify_logits(spec, model, tokenizer, texts))
    from fedslm.training import evaluate_lm
    from fedslm.runtime import token_blocks

    t = spec.cfg.training
    result = evaluate_lm(model, token_blocks(texts, tokenizer, seq_len=t.seq_len),
                         batch_size=t.batch_size, max_batches=t.eval_max_batches)
    return {"loss": result.loss, "perplexity": result.perplexity, "accuracy": result.accuracy,
            "tokens": result.num_tokens}


def classify_logits(spec: ModelSpec, model, tokenizer, records: tuple[str, ...]):
    """(logits, labels) of a classify model over ``records``, with the client evaluation's
    settings (``training.seq_len``, ``batch_size``, ``eval_max_batches``)."""
    from fedslm.classifier import record_logits

    assert spec.cfg is not None
    t = spec.cfg.training
    if t.eval_max_batches:
        records = records[: t.eval_max_batches * t.batch_size]
    return record_logits(model, tokenizer, records, seq_len=t.seq_len, batch_size=t.batch_size)
