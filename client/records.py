"""A client's records, their tensors, round seeds and the task's evaluation of them:
one place both training paths read from.

``fedslm.client.task`` (plain and DP training, evaluation) and ``fedslm.client.personal``
(personalization) both start here, so neither imports the other.
"""

from __future__ import annotations

from fedslm.audit.canaries import with_canaries
from fedslm.client.attack import poisoned_split
from fedslm.config import ExperimentConfig
from fedslm.device import autocast, model_device
from fedslm.data.local import local_split
from fedslm.runtime import client_split, encoded, experiment_model
from fedslm.tasks import get_task


def round_seed(seed: int, partition_id: int, server_round: int) -> int:
    """Distinct, reproducible data order per (experiment seed, client, round)."""
    return (seed * 1_000_003 + partition_id * 10_007 + server_round) % (2**31 - 1)


def client_texts(cfg: ExperimentConfig, partition_id: int, split: str, data_path: str = "", *,
                 attack_round: int = 0):
    """This client's records (``fedslm.tasks``): its own files under ``data_path`` (a real
    device), or its partition of the configured corpus (simulation). ``attack_round``
    (``fedslm.client.attack.data_attack_round``; 0: honest) is the round a simulated
    data attack sees."""
    if data_path:
        return getattr(local_split(data_path, test_fraction=cfg.data.test_fraction,
                                   seed=cfg.data.seed, task=cfg.task.name, data=cfg.data), split)
    own = with_canaries(cfg, partition_id, client_split(  # privacy.audit's canaries
        cfg.data, num_clients=cfg.federation.num_clients, partition_id=partition_id,
        task=cfg.task.name))
    return getattr(poisoned_split(cfg, own, partition_id=partition_id,  # attack.kind's data attack
                                  attack_round=attack_round), split)


def client_tensors(cfg: ExperimentConfig, partition_id: int, split: str, tokenizer, data_path: str = "",
                   *, attack_round: int = 0):
    """This client's ``split`` encoded by the task, one row per example; with
    ``privacy.unit=document`` the train split has one row per document (the DP-SGD record)."""
    texts = client_texts(cfg, partition_id, split, data_path, attack_round=attack_round)
    if split == "train" and cfg.privacy.unit == "document":
        from fedslm.tasks.causal_lm import document_blocks

        return (document_blocks(texts, tokenizer, seq_len=cfg.training.seq_len),)
    return encoded(cfg, texts, tokenizer)


def client_data(cfg: ExperimentConfig, partition_id: int, split: str, data_path: str = "", *,
                attack_round: int = 0):
    """The process's model and this client's encoded ``split``."""
    model, tokenizer = experiment_model(cfg)
    return model, client_tensors(cfg, partition_id, split, tokenizer, data_path,
                                 attack_round=attack_round)


def task_metrics(cfg: ExperimentConfig, model, tensors, records) -> dict:
    """Evaluation statistics and, for generating tasks, scores of a bounded sample of
    generations (their texts stay here: only numbers leave the client)."""
    task = get_task(cfg.task.name)
    with autocast(model_device(model), cfg.training.precision):  # as it was trained
        metrics = task.evaluate(model, tensors, batch_size=cfg.training.batch_size,
                                max_batches=cfg.training.eval_max_batches)
        if cfg.task.eval_generations > 0:
            _, tokenizer = experiment_model(cfg)
            generated, _examples = task.generation_metrics(model, records, tokenizer, cfg)
            metrics.update(generated)
    return metrics
