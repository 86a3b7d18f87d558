"""Per-process caches of what is expensive and identical across rounds and clients.

In simulation one Ray worker serves many virtual clients, round after round. Loading the
base model, wrapping it with LoRA and tokenizing a client's text must not happen each
round: the PEFT model is built once per process and only its adapter tensors are
overwritten per call (every adapter tensor is replaced, so no state leaks between
clients); a client's encoded records (``fedslm.tasks``) are cached per process.
"""

from __future__ import annotations

import functools
from dataclasses import astuple

import torch

from fedslm.adapters import apply_roles, reset_to_init
from fedslm.aggregation import aggregation_rule
from fedslm.config import DataConfig, ExperimentConfig, ModelConfig, PeftConfig
from fedslm.data import ClientSplit, load_client_split, synthetic_public_corpus
from fedslm.device import quantization_kwargs, resolve_device
from fedslm.model import build_peft_model, load_base_model, prepare_for_training, resolve_model_path
from fedslm.tasks import get_task


def model_path(model_cfg: ModelConfig, data_seed: int = 0) -> str:
    """Local directory or hub name of the base model (builds the builtin one once)."""
    return _model_path(model_cfg.name_or_path, model_cfg.cache_dir, data_seed)


@functools.lru_cache(maxsize=4)
def _model_path(name_or_path: str, cache_dir: str, data_seed: int) -> str:
    cfg = ModelConfig(name_or_path=name_or_path, cache_dir=cache_dir)
    return resolve_model_path(cfg, public_texts=lambda: synthetic_public_corpus(data_seed))


@functools.lru_cache(maxsize=1)
def _peft_model(path: str, dtype: str, peft_key: tuple, personalization: str, task: str,
                model_kwargs: tuple, device: str, quantization: str, gradient_checkpointing: bool,
                fixed_lora_a: bool = False, seed: int = 0):
    spec = get_task(task)
    where = torch.device(device)
    base, tokenizer = load_base_model(path, dtype=dtype, auto_model=spec.auto_model(),
                                      **dict(model_kwargs), **quantization_kwargs(quantization, where))
    base = prepare_for_training(base, gradient_checkpointing=gradient_checkpointing,
                                quantized=quantization != "none")
    peft_cfg = PeftConfig(*peft_key[:3], list(peft_key[3]), peft_key[4])
    model = build_peft_model(base, peft_cfg, personalization=personalization,
                             task_type=spec.peft_task_type)
    if quantization == "none":  # a quantized base was placed by from_pretrained's device_map
        model.to(where)
    if fixed_lora_a:  # aggregation hook (FFA-LoRA): A fixed at the seeded init, see adapters
        apply_roles(model, personalization, fixed_lora_a=True)
        reset_to_init(model, "fixed", seed=seed)
    return model, tokenizer


def peft_model(model_cfg: ModelConfig, peft_cfg: PeftConfig, *, data_seed: int = 0,
               personalization: str = "none", task: str = "causal_lm",
               model_kwargs: dict | None = None, device: str = "cpu",
               gradient_checkpointing: bool = False, fixed_lora_a: bool = False, seed: int = 0):
    """The process's PEFT model and tokenizer for this (base, LoRA, personalization, task,
    device, quantization, checkpointing, aggregation rule).

    One model per process whatever the number of clients: personal adapters are loaded
    into it per call from each client's state dir, never kept here. Asking for another
    key replaces it (``maxsize=1``): never two bases in one process.
    """
    key = astuple(peft_cfg)
    key = key[:3] + (tuple(key[3]),) + key[4:]
    return _peft_model(model_path(model_cfg, data_seed), model_cfg.dtype, key, personalization,
                       task, tuple(sorted((model_kwargs or {}).items())), str(device),
                       model_cfg.quantization, bool(gradient_checkpointing),
                       fixed_lora_a, seed if fixed_lora_a else 0)


def experiment_model(cfg: ExperimentConfig):
    """``peft_model`` for an experiment config (base, LoRA, personalization, task, and
    ``training.device`` / ``gradient_checkpointing`` from it)."""
    spec = get_task(cfg.task.name)
    return peft_model(cfg.model, cfg.peft, data_seed=cfg.data.seed,
                      personalization=cfg.personalization.method, task=cfg.task.name,
                      model_kwargs=spec.model_kwargs(cfg),
                      device=str(resolve_device(cfg.training.device)),
                      gradient_checkpointing=cfg.training.gradient_checkpointing,
                      fixed_lora_a=aggregation_rule(cfg.aggregation.name).fixed_lora_a,
                      seed=cfg.training.seed)


def client_split(data_cfg: DataConfig, *, num_clients: int, partition_id: int,
                 task: str = "causal_lm") -> ClientSplit:
    return load_client_split(data_cfg, num_clients=num_clients, partition_id=partition_id, task=task)


_ENCODED: dict[tuple, tuple[torch.Tensor, ...]] = {}
_MAX_CACHED_SETS = 256


def encoded(cfg: ExperimentConfig, records: tuple[str, ...], tokenizer) -> tuple[torch.Tensor, ...]:
    """``records`` encoded by the experiment's task (one row per example), once per process."""
    key = (cfg.task.name, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
           cfg.training.seq_len, hash(tuple(records)))
    if key not in _ENCODED:
        if len(_ENCODED) >= _MAX_CACHED_SETS:
            _ENCODED.pop(next(iter(_ENCODED)))
        _ENCODED[key] = get_task(cfg.task.name).encode(records, tokenizer, cfg)
    return _ENCODED[key]


def token_blocks(texts: tuple[str, ...], tokenizer, *, seq_len: int) -> torch.Tensor:
    """Packed ``[N, seq_len]`` causal-LM blocks for ``texts`` (cached like ``encoded``)."""
    from fedslm.config import TrainingConfig

    cfg = ExperimentConfig(training=TrainingConfig(seq_len=seq_len))
    return encoded(cfg, tuple(texts), tokenizer)[0]
