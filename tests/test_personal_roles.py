"""The personal role of fedslm.adapters.parameter_role and what it does to a real PEFT model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedslm.adapters import (
    AdapterError,
    adapter_arrays,
    load_adapter_arrays,
    parameter_role,
    reset_to_init,
)
from fedslm.config import PeftConfig
from fedslm.model import build_peft_model, load_base_model

Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("name", "bias", "personalization", "role"),
    [
        (f"{Q}.lora_A.default.weight", "none", "none", "shared"),
        (f"{Q}.lora_B.default.weight", "none", "finetune", "shared"),
        (f"{Q}.lora_A.default.weight", "none", "split", "shared"),
        (f"{Q}.lora_B.default.weight", "none", "split", "personal"),
        (f"{Q}.lora_B.weight", "none", "split", "personal"),  # checkpoint name
        ("base_model.model.model.embed_tokens.lora_embedding_B.default", "none", "split", "personal"),
        ("base_model.model.model.embed_tokens.lora_embedding_A.default", "none", "split", "shared"),
        (f"{Q}.base_layer.bias", "lora_only", "split", "shared"),
        (f"{Q}.lora_A.default.weight", "none", "dual", "shared"),
        (f"{Q}.lora_B.default.weight", "none", "dual", "shared"),
        (f"{Q}.lora_A.personal.weight", "none", "dual", "personal"),
        (f"{Q}.lora_B.personal.weight", "none", "dual", "personal"),
        (f"{Q}.base_layer.bias", "lora_only", "dual", "shared"),
        (f"{Q}.lora_A.default.weight", "none", "local_only", "personal"),
        (f"{Q}.base_layer.bias", "lora_only", "local_only", "personal"),
        (f"{Q}.base_layer.weight", "all", "local_only", "frozen"),
        (f"{Q}.base_layer.bias", "none", "dual", "frozen"),
        ("base_model.model.model.norm.weight", "none", "split", "frozen"),
    ],
)
def test_parameter_role_with_personalization(name, bias, personalization, role):
    assert parameter_role(name, bias=bias, personalization=personalization) == role


def _model(tiny_model_dir, personalization: str, seed: int = 0, **peft):
    base, _ = load_base_model(str(tiny_model_dir), dtype="float32")
    torch.manual_seed(seed)
    return build_peft_model(base, PeftConfig(**{"dropout": 0.0, **peft}), personalization=personalization)


# 2 layers x (q_proj, v_proj) = 4 LoRA layers, each with A [8, 64] and B [64, 8].
@pytest.mark.parametrize(
    ("personalization", "n_shared", "n_personal", "shared_kind", "personal_kind"),
    [
        ("none", 8, 0, None, None),
        ("finetune", 8, 0, None, None),
        ("split", 4, 4, ".lora_A.", ".lora_B."),
        ("dual", 8, 8, None, None),
        ("local_only", 0, 8, None, None),
    ],
)
def test_shared_and_personal_sets(tiny_model_dir, personalization, n_shared, n_personal,
                                  shared_kind, personal_kind):
    model = _model(tiny_model_dir, personalization)
    shared, personal = adapter_arrays(model, "shared"), adapter_arrays(model, "personal")
    assert (len(shared), len(personal)) == (n_shared, n_personal)
    if shared_kind:
        assert all(shared_kind in n for n in shared) and all(personal_kind in n for n in personal)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(a.size for a in shared.values()) + sum(a.size for a in personal.values())
    assert trainable == (16 if personalization == "dual" else 8) * 512  # 8 tensors x 512 each


def test_dual_has_two_active_adapters_with_the_same_checkpoint_names(tiny_model_dir):
    model = _model(tiny_model_dir, "dual")
    shared, personal = adapter_arrays(model, "shared"), adapter_arrays(model, "personal")
    assert set(shared) == set(personal)  # each is a standalone PEFT adapter
    ids = torch.arange(1, 17).view(1, 16)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        name = next(n for n in personal if ".lora_B." in n)
        load_adapter_arrays(model, {**personal, name: np.full_like(personal[name], 0.1)}, "personal")
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after)  # the personal adapter is active at inference


def test_requires_grad_disagreement_is_caught_under_personalization(tiny_model_dir):
    model = _model(tiny_model_dir, "split")
    model.get_parameter(f"{Q}.lora_B.default.weight").requires_grad_(False)
    with pytest.raises(AdapterError, match=r"lora_B\.default\.weight: role=personal"):
        adapter_arrays(model, "shared")


def test_reset_to_init_touches_only_the_role(tiny_model_dir):
    model = _model(tiny_model_dir, "dual")
    rng = np.random.default_rng(0)
    for role in ("shared", "personal"):
        load_adapter_arrays(model, {n: rng.standard_normal(a.shape).astype(np.float32)
                                    for n, a in adapter_arrays(model, role).items()}, role)
    shared = adapter_arrays(model, "shared")
    reset_to_init(model, "personal", seed=3)
    after_shared, personal = adapter_arrays(model, "shared"), adapter_arrays(model, "personal")
    assert all(np.array_equal(after_shared[n], shared[n]) for n in shared)
    assert all(not personal[n].any() for n in personal if ".lora_B." in n)  # PEFT init: B = 0
    reset_to_init(model, "personal", seed=3)
    again = adapter_arrays(model, "personal")
    assert all(np.array_equal(again[n], personal[n]) for n in personal)  # reproducible


def test_local_only_fresh_adapter_is_the_servers_initial_adapter(tiny_model_dir):
    server = _model(tiny_model_dir, "none")
    torch.manual_seed(11)  # what fedslm.server.experiment.initial_adapter does for training.seed=11
    for module in server.modules():
        if hasattr(module, "reset_lora_parameters"):
            for name in module.lora_A.keys():
                module.reset_lora_parameters(name, True)
    client = _model(tiny_model_dir, "local_only", seed=5)
    reset_to_init(client, "personal", seed=11)
    expected, got = adapter_arrays(server, "shared"), adapter_arrays(client, "personal")
    assert set(expected) == set(got)
    assert all(np.array_equal(expected[n], got[n]) for n in expected)
