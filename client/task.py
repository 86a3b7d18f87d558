"""What a client does with a global adapter: train on its own split, or evaluate it.

Plain functions over the experiment config, no Flower imports: the ClientApp handlers
unpack messages and call these; tests call them directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from client.personal import TRAINED_IN_FIT, evaluate_personal, fit_personal
from client.personal_state import resolve_state_dir
from client.privacy import BudgetExhausted
from client.train import evaluate_lm, train_local
from fedslm.adapters import adapter_arrays, load_adapter_arrays
from fedslm.audit.canaries import with_canaries
from fedslm.config import ExperimentConfig
from fedslm.data.local import local_split
from fedslm.runtime import client_split, experiment_model, token_blocks

Metrics = dict[str, int | float]


def round_seed(seed: int, partition_id: int, server_round: int) -> int:
    """Distinct, reproducible data order per (experiment seed, client, round)."""
    return (seed * 1_000_003 + partition_id * 10_007 + server_round) % (2**31 - 1)


def client_texts(cfg: ExperimentConfig, partition_id: int, split: str, data_path: str = ""):
    """This client's texts: its own files under ``data_path`` (a real device), or its
    partition of the configured corpus (simulation)."""
    if data_path:
        return getattr(local_split(data_path, text_key=cfg.data.text_key,
                                   test_fraction=cfg.data.test_fraction, seed=cfg.data.seed), split)
    return getattr(with_canaries(cfg, partition_id, client_split(  # privacy.audit's canaries
        cfg.data, num_clients=cfg.federation.num_clients, partition_id=partition_id)), split)


def train_metrics(result, blocks: torch.Tensor, partition_id: int) -> Metrics:
    """The scalars a training reply carries; ``num-examples`` (train blocks) weights FedAvg."""
    return {"loss": result.loss, "steps": result.steps, "seconds": result.seconds,
            "num-examples": int(blocks.shape[0]), "partition-id": partition_id}


def _client_data(cfg: ExperimentConfig, partition_id: int, split: str, data_path: str = ""):
    model, tokenizer = experiment_model(cfg)
    texts = client_texts(cfg, partition_id, split, data_path)
    return model, token_blocks(texts, tokenizer, seq_len=cfg.training.seq_len)


def fit(cfg: ExperimentConfig, global_arrays: Mapping[str, np.ndarray], *, partition_id: int,
        server_round: int, proximal_mu: float = 0.0,
        client_dir: Path | None = None, data_path: str = "") -> tuple[dict[str, np.ndarray], Metrics]:
    """Train the global adapter on this client's train split; return the new adapter.

    ``client_dir`` is this client's own state dir (``client.node``; default
    ``<resolve_state_dir(cfg)>/<partition_id>``). With a personalization that trains a
    personal part (``client.personal``), that part is kept there and not returned. With
    ``privacy.mode=dp_sgd`` the round runs DP-SGD against the ledger kept there and may
    raise ``client.privacy.BudgetExhausted``.
    """
    client_dir = client_dir or resolve_state_dir(cfg) / str(partition_id)
    if cfg.personalization.method in TRAINED_IN_FIT:
        return fit_personal(cfg, global_arrays, partition_id=partition_id,
                            server_round=server_round, proximal_mu=proximal_mu,
                            client_dir=client_dir, data_path=data_path)
    model, blocks = _client_data(cfg, partition_id, "train", data_path)
    load_adapter_arrays(model, global_arrays)
    if cfg.privacy.mode == "dp_sgd":
        return _fit_dp_sgd(cfg, model, blocks, partition_id=partition_id,
                           server_round=server_round, ledger_dir=client_dir)
    reference = None
    if proximal_mu > 0:
        reference = {k: torch.from_numpy(np.array(v)) for k, v in global_arrays.items()}
    result = train_local(model, blocks, cfg.training, proximal_mu=proximal_mu,
                         reference=reference,
                         generator_seed=round_seed(cfg.training.seed, partition_id, server_round))
    return adapter_arrays(model), train_metrics(result, blocks, partition_id)


def _fit_dp_sgd(cfg: ExperimentConfig, model, blocks, *, partition_id: int, server_round: int,
                ledger_dir: Path) -> tuple[dict[str, np.ndarray], Metrics]:
    from client.dp_sgd import train_dp_sgd

    try:
        result, dp_metrics = train_dp_sgd(
            model, blocks, cfg.training, cfg.privacy, state_dir=ledger_dir, server_round=server_round,
            generator_seed=round_seed(cfg.training.seed, partition_id, server_round))
    except BudgetExhausted as exc:
        exc.metrics["partition-id"] = partition_id
        raise
    return adapter_arrays(model), {**train_metrics(result, blocks, partition_id), **dp_metrics}


def evaluate(cfg: ExperimentConfig, global_arrays: Mapping[str, np.ndarray], *,
             partition_id: int, server_round: int = 0, client_dir: Path | None = None,
             data_path: str = "") -> Metrics:
    """Loss, perplexity and next-token accuracy of the global adapter on this client's test split.

    With personalization, the personal model's too (``client.personal.evaluate_personal``).
    """
    if cfg.personalization.method != "none":
        return evaluate_personal(cfg, global_arrays, partition_id=partition_id,
                                 server_round=server_round,
                                 client_dir=client_dir or resolve_state_dir(cfg) / str(partition_id),
                                 data_path=data_path)
    model, blocks = _client_data(cfg, partition_id, "test", data_path)
    load_adapter_arrays(model, global_arrays)
    result = evaluate_lm(model, blocks, batch_size=cfg.training.batch_size,
                         max_batches=cfg.training.eval_max_batches)
    return {
        "loss": result.loss,
        "perplexity": math.exp(min(result.loss, 50.0)),
        "accuracy": result.accuracy,
        "num-examples": result.num_examples,
        "num-tokens": result.num_tokens,
        "partition-id": partition_id,
    }
