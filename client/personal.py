"""What each personalization method does on a client; plain functions, no Flower.

The global arrays a client receives and returns hold only ``shared`` tensors
(``fedslm.adapters.parameter_role``); ``personal`` ones are read from and written to
the client's state dir (``fedslm.personal_state``) and never returned.

- ``local_only``: every trainable tensor is personal; nothing travels.
- ``split``: A matrices travel, B matrices are personal; both train locally.
- ``dual``: the ``default`` adapter travels, the ``personal`` adapter does not; both
  train locally and both are active at inference.
- ``finetune``: the whole adapter travels (``fit`` is the plain one); on each global
  adapter sent for evaluation the client fine-tunes a copy for
  ``personalization.finetune_steps`` steps at ``finetune_learning_rate``, evaluates it
  and keeps it (so it always has one: a fresh copy of each new global adapter).

Under sample-level DP (``privacy.mode`` ``dp_sgd`` or ``dp_sgd+dp_fedavg``) every one of
these trainings runs DP-SGD (``fedslm.client.dp_sgd.train_dp_sgd``) against the client's
one ledger: ``fit``'s joint training of the shared and personal tensors, and
``finetune``'s evaluate-time fine-tuning. The personal adapter is as private as the
shared one once it is used or exported, so its steps are spent from the same budget;
``privacy.max_epsilon`` refuses either (a refused fine-tune keeps the last personal copy).

Evaluation protocol, every method: on the client's own test split, the *global* model
is the received shared tensors with personal ones at their fresh init (for ``split`` and
``local_only`` that is the base model, since fresh LoRA B is zero; for ``dual`` it is
the global adapter alone), and the *personal* model is the one the client keeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fedslm.personal_state import PersonalState, load_personal, save_last_global, save_personal
from fedslm.client.privacy import BudgetExhausted
from fedslm.client.records import client_tensors, client_texts, round_seed, task_metrics
from fedslm.training import train_local
from fedslm.adapters import adapter_arrays, load_adapter_arrays, reset_to_init
from fedslm.config import ExperimentConfig
from fedslm.keys import PARTITION_ID, WEIGHT_KEY
from fedslm.runtime import experiment_model, model_path
from fedslm.tasks import get_task

Metrics = dict[str, int | float | list[int]]

TRAINED_IN_FIT = ("local_only", "split", "dual")  # methods whose personal part trains in fit
FINETUNE_SEED_OFFSET = 7_919  # data order of the evaluate-time fine-tuning differs from fit's


_round_seed = round_seed
_blocks = client_tensors


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
    from fedslm.tasks.classify import label_names

    save_personal(client_dir, arrays, method=cfg.personalization.method,
                  server_round=server_round, updates=updates, peft_cfg=cfg.peft,
                  base_model=model_path(cfg.model, cfg.data.seed), task=cfg.task.name,
                  labels=tuple(label_names(cfg)) if cfg.task.name == "classify" else ())


def fit_personal(cfg: ExperimentConfig, global_arrays: Mapping[str, np.ndarray], *,
                 partition_id: int, server_round: int, proximal_mu: float = 0.0,
                 client_dir: Path, data_path: str = "",
                 attack_round: int = 0) -> tuple[dict[str, np.ndarray], Metrics]:
    """Train shared + personal tensors on the train split; keep personal, return shared."""
    method = cfg.personalization.method
    if method not in TRAINED_IN_FIT:
        raise ValueError(f"personalization.method: {method!r} does not train a personal part in fit")
    model, tokenizer = experiment_model(cfg)
    blocks = _blocks(cfg, partition_id, "train", tokenizer, data_path, attack_round=attack_round)
    state = load_personal(client_dir, method=method)
    _load(model, global_arrays, state, seed=cfg.training.seed)
    reference = None
    if proximal_mu > 0:  # FedProx pulls only the shared tensors towards the global ones
        reference = {k: torch.from_numpy(np.array(v)) for k, v in global_arrays.items()}
    result, dp_metrics = train_private_or_plain(
        cfg, model, blocks, cfg.training, client_dir=client_dir, server_round=server_round,
        partition_id=partition_id, proximal_mu=proximal_mu, reference=reference,
        generator_seed=_round_seed(cfg.training.seed, partition_id, server_round))
    personal = adapter_arrays(model, "personal")
    updates = (state.updates if state else 0) + 1
    _save(cfg, client_dir, personal, server_round=server_round, updates=updates)
    metrics: Metrics = {
        "loss": result.loss,
        "steps": result.steps,
        "seconds": result.seconds,
        WEIGHT_KEY: int(blocks[0].shape[0]),
        PARTITION_ID: partition_id,
        "personal_updates": updates,
        "personal_bytes": int(sum(a.nbytes for a in personal.values())),
        **dp_metrics,
    }
    return adapter_arrays(model, "shared"), metrics


def train_private_or_plain(cfg: ExperimentConfig, model, blocks, training, *, client_dir: Path,
                           server_round: int, partition_id: int, generator_seed: int,
                           proximal_mu: float = 0.0, reference=None) -> tuple:
    """(TrainResult, DP metrics): DP-SGD against this client's ledger under sample-level
    DP (may raise ``BudgetExhausted``, naming the partition), else plain ``train_local``
    with no DP metrics."""
    task = get_task(cfg.task.name)
    if not cfg.privacy.sample_level:
        return train_local(model, blocks, training, proximal_mu=proximal_mu, reference=reference,
                           loss_fn=task.loss, generator_seed=generator_seed), {}
    from fedslm.client.dp_sgd import train_dp_sgd

    try:
        return train_dp_sgd(model, blocks, training, cfg.privacy, state_dir=client_dir,
                            server_round=server_round, generator_seed=generator_seed, task=task)
    except BudgetExhausted as exc:
        exc.metrics[PARTITION_ID] = partition_id
        raise


def evaluate_personal(cfg: ExperimentConfig, global_arrays: Mapping[str, np.ndarray], *,
                      partition_id: int, server_round: int, client_dir: Path,
                      data_path: str = "") -> Metrics:
    """The task's metrics of the global and of the personal model on the client's test split.

    A client with no personal adapter yet (never trained) reports its global metrics as
    personal too, with ``has_personal=0``: every reply carries the same keys, which
    Flower's metric aggregation requires.
    """
    method = cfg.personalization.method
    model, tokenizer = experiment_model(cfg)
    test = _blocks(cfg, partition_id, "test", tokenizer, data_path)
    records = client_texts(cfg, partition_id, "test", data_path)

    def score() -> Metrics:
        return task_metrics(cfg, model, test, records)

    _load(model, global_arrays, None, seed=cfg.training.seed)  # the global model
    global_result = score()
    state = load_personal(client_dir, method=method)
    if method == "finetune":  # a fresh private copy of this global adapter, kept
        steps = dataclasses.replace(cfg.training, local_steps=cfg.personalization.finetune_steps,
                                    learning_rate=cfg.personalization.finetune_learning_rate)
        seed = _round_seed(cfg.training.seed + FINETUNE_SEED_OFFSET, partition_id, server_round)
        try:
            _, dp = train_private_or_plain(
                cfg, model, _blocks(cfg, partition_id, "train", tokenizer, data_path), steps,
                client_dir=client_dir, server_round=server_round, partition_id=partition_id,
                generator_seed=seed)
        except BudgetExhausted as exc:  # no more fine-tuning: the last personal copy stands
            return _refused_finetune(cfg, model, state, global_result, score, exc,
                                     partition_id=partition_id)
        _save(cfg, client_dir, adapter_arrays(model, "shared"),
              server_round=server_round, updates=(state.updates if state else 0) + 1)
        return {**comparison_metrics(cfg, global_result, score(), has_personal=True,
                                     personal_round=server_round, partition_id=partition_id),
                **_finetune_dp_metrics(cfg, dp, refused=False)}
    if state is None:
        return comparison_metrics(cfg, global_result, global_result, has_personal=False,
                                  personal_round=-1, partition_id=partition_id)
    load_adapter_arrays(model, state.arrays, "personal")
    if method in ("split", "dual"):  # their personal model needs it: kept for offline use
        # with ffa the global's A never travels: the seeded one completes the saved adapter
        save_last_global(client_dir, {**global_arrays, **adapter_arrays(model, "fixed")}, server_round=server_round,
                         peft_cfg=cfg.peft, base_model=model_path(cfg.model, cfg.data.seed))
    return comparison_metrics(cfg, global_result, score(), has_personal=True,
                              personal_round=state.round, partition_id=partition_id)


def _finetune_dp_metrics(cfg: ExperimentConfig, dp: Metrics, *, refused: bool) -> Metrics:
    """The ledger after an evaluate-time fine-tune; the same keys in every DP reply."""
    if not cfg.privacy.sample_level:
        return {}
    return {"dp-epsilon": float(dp.get("dp-epsilon", 0.0)), "dp-delta": float(dp.get("dp-delta", 0.0)),
            "dp-steps-total": int(dp.get("dp-steps-total", 0)),
            "dp-finetune-refused": int(refused)}


def _refused_finetune(cfg: ExperimentConfig, model, state: PersonalState | None, global_result: Metrics,
                      score, exc: BudgetExhausted, *, partition_id: int) -> Metrics:
    """A fine-tune the budget refused: evaluate the personal copy kept from before (the
    global model when there is none), and say so."""
    dp = _finetune_dp_metrics(cfg, exc.metrics, refused=True)
    if state is None:
        return {**comparison_metrics(cfg, global_result, global_result, has_personal=False,
                                     personal_round=-1, partition_id=partition_id), **dp}
    load_adapter_arrays(model, state.arrays, "shared")
    return {**comparison_metrics(cfg, global_result, score(), has_personal=True,
                                 personal_round=state.round, partition_id=partition_id), **dp}


def comparison_metrics(cfg: ExperimentConfig, global_result: Metrics, personal_result: Metrics, *,
                       has_personal: bool, personal_round: int, partition_id: int) -> Metrics:
    """One client's evaluate reply: the global model's task metrics under their own names,
    the personal model's as ``personal_*``, and ``personal_gain`` (the task's: for
    perplexity the relative reduction in percent, 100 * (1 - ppl_personal / ppl_global);
    for classification macro-F1 points; > 0: personal is better)."""
    task = get_task(cfg.task.name)
    personal = {f"personal_{k}": v for k, v in personal_result.items()
                if k not in (WEIGHT_KEY, "num-tokens")}
    return {
        **global_result,
        **personal,
        "personal_gain": task.gain(global_result, personal_result),
        "has_personal": int(has_personal),
        "personal_round": int(personal_round),
        PARTITION_ID: partition_id,
    }
