"""What a client does with a global adapter: train on its own split, or evaluate it.

Plain functions over the experiment config, no Flower imports: the ClientApp handlers
unpack messages and call these; tests call them directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fedslm.client.personal import TRAINED_IN_FIT, evaluate_personal, fit_personal
from fedslm.rundir import resolve_state_dir
from fedslm.client.privacy import BudgetExhausted
from fedslm.client.records import client_data, client_texts, round_seed, task_metrics
from fedslm.training import train_local
from fedslm.adapters import adapter_arrays, load_adapter_arrays
from fedslm.config import ExperimentConfig
from fedslm.keys import PARTITION_ID, WEIGHT_KEY
from fedslm.tasks import get_task

Metrics = dict[str, int | float | list[int]]

__all__ = ["client_texts", "evaluate", "fit", "round_seed"]


def train_metrics(result, tensors, partition_id: int) -> Metrics:
    """The scalars a training reply carries; ``num-examples`` (train examples) weights FedAvg."""
    return {"loss": result.loss, "steps": result.steps, "seconds": result.seconds,
            WEIGHT_KEY: int(tensors[0].shape[0]), PARTITION_ID: partition_id}


def train_examples(cfg: ExperimentConfig, partition_id: int, data_path: str = "") -> int:
    """The ``num-examples`` this client's training reply claims (its train rows), before
    training: a weighted SecAgg+ round needs it to scale the update."""
    _, tensors = client_data(cfg, partition_id, "train", data_path)
    return int(tensors[0].shape[0])


def fit(cfg: ExperimentConfig, global_arrays: Mapping[str, np.ndarray], *, partition_id: int,
        server_round: int, proximal_mu: float = 0.0, client_dir: Path | None = None,
        data_path: str = "", attack_round: int = 0) -> tuple[dict[str, np.ndarray], Metrics]:
    """Train the global adapter on this client's train split; return the new adapter.

    ``client_dir`` is this client's own state dir (``fedslm.client.node``; default
    ``<resolve_state_dir(cfg)>/<partition_id>``). With a personalization that trains a
    personal part (``fedslm.client.personal``), that part is kept there and not returned. With
    ``privacy.mode=dp_sgd`` the round runs DP-SGD against the ledger kept there and may
    raise ``fedslm.client.privacy.BudgetExhausted``. ``attack_round``: see
    ``fedslm.client.attack.data_attack_round`` (0: honest records).
    """
    client_dir = client_dir or resolve_state_dir(cfg) / str(partition_id)
    if cfg.personalization.method in TRAINED_IN_FIT:
        return fit_personal(cfg, global_arrays, partition_id=partition_id,
                            server_round=server_round, proximal_mu=proximal_mu,
                            client_dir=client_dir, data_path=data_path, attack_round=attack_round)
    model, tensors = client_data(cfg, partition_id, "train", data_path, attack_round=attack_round)
    load_adapter_arrays(model, global_arrays)
    if cfg.privacy.sample_level:
        return _fit_dp_sgd(cfg, model, tensors, partition_id=partition_id,
                           server_round=server_round, ledger_dir=client_dir)
    reference = None
    if proximal_mu > 0:
        reference = {k: torch.from_numpy(np.array(v)) for k, v in global_arrays.items()}
    result = train_local(model, tensors, cfg.training, proximal_mu=proximal_mu,
                         reference=reference, loss_fn=get_task(cfg.task.name).loss,
                         generator_seed=round_seed(cfg.training.seed, partition_id, server_round))
    return adapter_arrays(model), train_metrics(result, tensors, partition_id)


def _fit_dp_sgd(cfg: ExperimentConfig, model, tensors, *, partition_id: int, server_round: int,
                ledger_dir: Path) -> tuple[dict[str, np.ndarray], Metrics]:
    from fedslm.client.dp_sgd import train_dp_sgd

    try:
        result, dp_metrics = train_dp_sgd(
            model, tensors, cfg.training, cfg.privacy, state_dir=ledger_dir, server_round=server_round,
            generator_seed=round_seed(cfg.training.seed, partition_id, server_round),
            task=get_task(cfg.task.name))
    except BudgetExhausted as exc:
        exc.metrics[PARTITION_ID] = partition_id
        raise
    return adapter_arrays(model), {**train_metrics(result, tensors, partition_id), **dp_metrics}


def evaluate(cfg: ExperimentConfig, global_arrays: Mapping[str, np.ndarray], *,
             partition_id: int, server_round: int = 0, client_dir: Path | None = None,
             data_path: str = "") -> Metrics:
    """The task's evaluation statistics of the global adapter on this client's test split
    (causal LM: loss, perplexity, next-token accuracy; classify: its confusion matrix;
    instruct: response loss plus ROUGE-L / exact match of greedy generations).

    With personalization, the personal model's too (``fedslm.client.personal.evaluate_personal``).
    """
    if cfg.personalization.method != "none":
        return evaluate_personal(cfg, global_arrays, partition_id=partition_id,
                                 server_round=server_round,
                                 client_dir=client_dir or resolve_state_dir(cfg) / str(partition_id),
                                 data_path=data_path)
    model, tensors = client_data(cfg, partition_id, "test", data_path)
    load_adapter_arrays(model, global_arrays)
    return {**task_metrics(cfg, model, tensors, client_texts(cfg, partition_id, "test", data_path)),
            PARTITION_ID: partition_id}

