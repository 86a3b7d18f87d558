"""What each personalization method does on a client; plain functions, no Flower.

The global arrays a client receives and returns hold only ``shared`` tensors
(``fedslm.adapters.parameter_role``); ``personal`` ones are read from and written to
the client's state dir (``client.personal_state``) and never returned.

- ``local_only``: every trainable tensor is personal; nothing travels.
- ``split``: A matrices travel, B matrices are personal; both train locally.
- ``dual``: the ``default`` adapter travels, the ``personal`` adapter does not; both
  train locally and both are active at inference.
- ``finetune``: the whole adapter travels (``fit`` is the plain one); on each global
  adapter sent for evaluation the client fine-tunes a copy for
  ``personalization.finetune_steps`` steps at ``finetune_learning_rate``, evaluates it
  and keeps it (so it always has one: a fresh copy of each new global adapter).

Evaluation protocol, every method: on the client's own test split, the *global* model
is the received shared tensors with personal ones at their fresh init (for ``split`` and
``local_only`` that is the base model, since fresh LoRA B is zero; for ``dual`` it is
the global adapter alone), and the *personal* model is the one the client keeps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from client.personal_state import PersonalState, load_personal, save_last_global, save_personal
from client.train import EvalResult, evaluate_lm, train_local
from fedslm.adapters import adapter_arrays, load_adapter_arrays, reset_to_init
from fedslm.config import ExperimentConfig
from fedslm.runtime import experiment_model, model_path, token_blocks

Metrics = dict[str, int | float]

TRAINED_IN_FIT = ("local_only", "split", "dual")  # methods whose personal part trains in fit
FINETUNE_SEED_OFFSET = 7_919  # data order of the evaluate-time fine-tuning differs from fit's


def _round_seed(seed: int, partition_id: int, server_round: int) -> int:
    from client.task import round_seed

    return round_seed(seed, partition_id, server_round)


def _blocks(cfg: ExperimentConfig, partition_id: int, split: str, tokenizer,
            data_path: str = "") -> torch.Tensor:
    from client.task import client_texts

    texts = client_texts(cfg, partition_id, split, data_path)
    return token_blocks(texts, tokenizer, seq_len=cfg.training.seq_len)


def _load(model, global_arrays: Mapping[str, np.ndarray], state: PersonalState | None,
          *, seed: int) -> None:
    """Every adapter tensor of the (process-shared) model gets this client's value."""
    load_adapter_arrays(model, global_arrays, "shared")
    if state is None:
        reset_to_init(model, "personal", seed=seed)
    else:
        load_adapter_arrays(model, state.arrays, "personal")


def _save(cfg: ExperimentConfig, client_dir: Path, arrays, *,
          server_round: int, updates: int) -> None:
    save_personal(client_dir, arrays, method=cfg.personalization.method,
                  server_round=server_round, updates=updates, peft_cfg=cfg.peft,
                  base_model=model_path(cfg.model, cfg.data.seed))


def fit_personal(cfg: ExperimentConfig, global_arrays: Mapping[str, np.ndarray], *,
                 partition_id: int, server_round: int, proximal_mu: float = 0.0,
                 client_dir: Path, data_path: str = "") -> tuple[dict[str, np.ndarray], Metrics]:
    """Train shared + personal tensors on the train split; keep personal, return shared."""
    method = cfg.personalization.method
    if method not in TRAINED_IN_FIT:
        raise ValueError(f"personalization.method: {method!r} does not train a personal part in fit")
    model, tokenizer = experiment_model(cfg)
    blocks = _blocks(cfg, partition_id, "train", tokenizer, data_path)
    state = load_personal(client_dir, method=method)
    _load(model, global_arrays, state, seed=cfg.training.seed)
    reference = None
    if proximal_mu > 0:  # FedProx pulls only the shared tensors towards the global ones
        reference = {k: torch.from_numpy(np.array(v)) for k, v in global_arrays.items()}
    result = train_local(model, blocks, cfg.training, proximal_mu=proximal_mu, reference=reference,
                         generator_seed=_round_seed(cfg.training.seed, partition_id, server_round))
    personal = adapter_arrays(model, "personal")
    updates = (state.updates if state else 0) + 1
    _save(cfg, client_dir, personal, server_round=server_round, updates=updates)
    metrics: Metrics = {
        "loss": result.loss,
        "steps": result.steps,
        "seconds": result.seconds,
        "num-examples": int(blocks.shape[0]),
        "partition-id": partition_id,
        "personal_updates": updates,
        "personal_bytes": int(sum(a.nbytes for a in personal.values())),
    }
    return adapter_arrays(model, "shared"), metrics


def evaluate_personal(cfg: ExperimentConfig, global_arrays: Mapping[str, np.ndarray], *,
                      partition_id: int, server_round: int, client_dir: Path,
                      data_path: str = "") -> Metrics:
    """Global and personal loss / perplexity / next-token accuracy on the client's test split.

    A client with no personal adapter yet (never trained) reports its global metrics as
    personal too, with ``has_personal=0``: every reply carries the same keys, which
    Flower's metric aggregation requires.
    """
    method = cfg.personalization.method
    model, tokenizer = experiment_model(cfg)
    test = _blocks(cfg, partition_id, "test", tokenizer, data_path)

    def score() -> EvalResult:
        return evaluate_lm(model, test, batch_size=cfg.training.batch_size,
                           max_batches=cfg.training.eval_max_batches)

    _load(model, global_arrays, None, seed=cfg.training.seed)  # the global model
    global_result = score()
    state = load_personal(client_dir, method=method)
    if method == "finetune":  # a fresh private copy of this global adapter, kept
        steps = dataclasses.replace(cfg.training, local_steps=cfg.personalization.finetune_steps,
                                    learning_rate=cfg.personalization.finetune_learning_rate)
        seed = _round_seed(cfg.training.seed + FINETUNE_SEED_OFFSET, partition_id, server_round)
        train_local(model, _blocks(cfg, partition_id, "train", tokenizer, data_path), steps,
                    generator_seed=seed)
        _save(cfg, client_dir, adapter_arrays(model, "shared"),
              server_round=server_round, updates=(state.updates if state else 0) + 1)
        return comparison_metrics(global_result, score(), has_personal=True,
                                  personal_round=server_round, partition_id=partition_id)
    if state is None:
        return comparison_metrics(global_result, global_result, has_personal=False,
                                  personal_round=-1, partition_id=partition_id)
    load_adapter_arrays(model, state.arrays, "personal")
    if method in ("split", "dual"):  # their personal model needs it: kept for offline use
        save_last_global(client_dir, global_arrays, server_round=server_round,
                         peft_cfg=cfg.peft, base_model=model_path(cfg.model, cfg.data.seed))
    return comparison_metrics(global_result, score(), has_personal=True,
                              personal_round=state.round, partition_id=partition_id)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def comparison_metrics(global_result: EvalResult, personal_result: EvalResult, *,
                       has_personal: bool, personal_round: int, partition_id: int) -> Metrics:
    """One client's evaluate reply: global as ``loss``/``perplexity``/``accuracy``, the
    personal model as ``personal_*``, and ``personal_gain`` = the relative perplexity
    reduction in percent, 100 * (1 - ppl_personal / ppl_global) (> 0: personal is better)."""
    g, p = global_result, personal_result
    return {
        "loss": g.loss,
        "perplexity": _ppl(g.loss),
        "accuracy": g.accuracy,
        "personal_loss": p.loss,
        "personal_perplexity": _ppl(p.loss),
        "personal_accuracy": p.accuracy,
        "personal_gain": 100.0 * (1.0 - math.exp(min(p.loss - g.loss, 50.0))),
        "has_personal": int(has_personal),
        "personal_round": int(personal_round),
        "num-examples": g.num_examples,
        "num-tokens": g.num_tokens,
        "partition-id": partition_id,
    }
