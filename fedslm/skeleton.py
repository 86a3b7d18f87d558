"""The experiment's PEFT model with only its adapter tensors in memory.

The server needs the initial LoRA weights (and FFA-LoRA's fixed A) but, with central
evaluation off, nothing of the base: building the base on the ``meta`` device and
allocating only the LoRA modules keeps a 0.5B-parameter base out of the ServerApp
process. The values are PEFT's own init under the same seed, in the same module order,
so they equal what the full model gives (``tests/test_skeleton.py``).
"""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoConfig

from fedslm.adapters import apply_roles, reset_lora
from fedslm.aggregation import aggregation_rule
from fedslm.config import ExperimentConfig
from fedslm.model import build_peft_model
from fedslm.runtime import model_path
from fedslm.tasks import get_task

LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def has_skeleton(cfg: ExperimentConfig) -> bool:
    """A task head (classification) and a quantized base take their values or shapes
    from the real weights: those build the full model."""
    return get_task(cfg.task.name).peft_task_type == "CAUSAL_LM" and cfg.model.quantization == "none"


def skeleton_model(cfg: ExperimentConfig) -> PeftModel:
    """Base on ``meta``, LoRA modules on the CPU with PEFT's init from ``training.seed``."""
    if not has_skeleton(cfg):
        raise ValueError(f"task.name={cfg.task.name!r} / model.quantization={cfg.model.quantization!r}: no skeleton")
    spec = get_task(cfg.task.name)
    config = AutoConfig.from_pretrained(model_path(cfg.model, cfg.data.seed))
    with torch.device("meta"):
        base = spec.auto_model().from_config(config, **spec.model_kwargs(cfg))
    for param in base.parameters():
        param.requires_grad_(False)
    model = build_peft_model(base, cfg.peft, personalization=cfg.personalization.method, task_type=spec.peft_task_type)
    for module in model.modules():
        for part in LORA_PARTS:
            holder = getattr(module, part, None)
            if isinstance(holder, (torch.nn.ModuleDict, torch.nn.ParameterDict)):
                holder.to_empty(device="cpu")
    if aggregation_rule(cfg.aggregation.name).fixed_lora_a:
        apply_roles(model, cfg.personalization.method, fixed_lora_a=True)
    reset_lora(model, seed=cfg.training.seed)
    return model
