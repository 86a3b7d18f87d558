"""What a client does with a global adapter: train on its own split, or evaluate it.

Plain functions over the experiment config, no Flower imports: the ClientApp handlers
unpack messages and call these; tests call them directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from client.train import evaluate_lm, train_local
from fedslm.adapters import adapter_arrays, load_adapter_arrays
from fedslm.config import ExperimentConfig
from fedslm.data.local import local_split
from fedslm.runtime import client_split, peft_model, token_blocks

Metrics = dict[str, int | float]


def round_seed(seed: int, partition_id: int, server_round: int) -> int:
    """Distinct, reproducible data order per (experiment seed, client, round)."""
    return (seed * 1_000_003 + partition_id * 10_007 + server_round) % (2**31 - 1)


def _client_data(cfg: ExperimentConfig, partition_id: int, split: str, data_path: str = ""):
    """This client's token blocks: its own files under ``data_path`` (a real device), or
    its partition of the configured corpus (simulation)."""
    model, tokenizer = peft_model(cfg.model, cfg.peft, data_seed=cfg.data.seed)
    if data_path:
        texts = getattr(local_split(data_path, text_key=cfg.data.text_key,
                                    test_fraction=cfg.data.test_fraction, seed=cfg.data.seed), split)
    else:
        texts = getattr(client_split(cfg.data, num_clients=cfg.federation.num_clients,
                                     partition_id=partition_id), split)
    return model, token_blocks(texts, tokenizer, seq_len=cfg.training.seq_len)


def fit(cfg: ExperimentConfig, global_arrays: Mapping[str, np.ndarray], *, partition_id: int,
        server_round: int, proximal_mu: float = 0.0,
        data_path: str = "") -> tuple[dict[str, np.ndarray], Metrics]:
    """Train the global adapter on this client's train split; return the new adapter."""
    model, blocks = _client_data(cfg, partition_id, "train", data_path)
    load_adapter_arrays(model, global_arrays)
    reference = None
    if proximal_mu > 0:
        reference = {k: torch.from_numpy(np.array(v)) for k, v in global_arrays.items()}
    result = train_local(model, blocks, cfg.training, proximal_mu=proximal_mu,
                         reference=reference,
                         generator_seed=round_seed(cfg.training.seed, partition_id, server_round))
    metrics: Metrics = {
        "loss": result.loss,
        "steps": result.steps,
        "seconds": result.seconds,
        "num-examples": int(blocks.shape[0]),
        "partition-id": partition_id,
    }
    return adapter_arrays(model), metrics


def evaluate(cfg: ExperimentConfig, global_arrays: Mapping[str, np.ndarray], *,
             partition_id: int, data_path: str = "") -> Metrics:
    """Loss, perplexity and next-token accuracy of the global adapter on this client's test split."""
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
