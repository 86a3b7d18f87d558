"""Builtin real-size shapes: exact published sizes, built locally, loaded like any checkpoint."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedslm import model as model_mod
from fedslm.config import ExperimentConfig, ModelConfig, PeftConfig
from fedslm.model import (SHAPE_CONFIGS, build_peft_model, count_parameters, ensure_shape_model,
                          load_base_model, max_sequence_length, resolve_model_path, shape_config)


@pytest.mark.parametrize(("name", "arch", "params", "lora_qv"), [
    ("smollm2-135m", "LlamaForCausalLM", 134_515_008, 460_800),
    ("qwen2.5-0.5b", "Qwen2ForCausalLM", 494_032_768, 540_672),
])
def test_shapes_have_the_published_sizes(name, arch, params, lora_qv) -> None:
    with torch.device("meta"):  # no memory: the shape alone
        base = AutoModelForCausalLM.from_config(shape_config(name))
    assert type(base).__name__ == arch
    assert base.config.tie_word_embeddings is True
    assert count_parameters(base)[1] == params
    for p in base.parameters():
        p.requires_grad_(False)
    lora = build_peft_model(base, PeftConfig(r=8))  # auto = q_proj, v_proj
    assert count_parameters(lora)[0] == lora_qv


def test_shape_names_are_model_names() -> None:
    cfg = ExperimentConfig.from_dict({"model": {"name_or_path": "builtin:shape:qwen2.5-0.5b"}})
    assert cfg.model.name_or_path == "builtin:shape:qwen2.5-0.5b"


def test_a_shape_is_built_once_and_loads_like_a_checkpoint(monkeypatch, tmp_path, tiny_model_dir) -> None:
    small = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 2048, "max_position_embeddings": 512, "tie_word_embeddings": True}
    monkeypatch.setitem(SHAPE_CONFIGS, "mini", small)
    path = ensure_shape_model(tmp_path, "mini", tokenizer_dir=tiny_model_dir)
    assert ensure_shape_model(tmp_path, "mini", tokenizer_dir=tiny_model_dir) == path  # cached
    assert max_sequence_length(str(path)) == 512
    (a, tok), (b, _) = (load_base_model(str(path), dtype="float32") for _ in range(2))
    assert a.config.vocab_size == 2048 and len(tok) < 2048  # builtin ids, real-size vocabulary
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not any(p.requires_grad for p in a.parameters())
    ids = tok("the farmer sells bread", return_tensors="pt")["input_ids"]
    assert a(input_ids=ids).logits.shape == (1, ids.shape[1], 2048)


def test_resolve_builds_the_tokenizer_model_first(monkeypatch, tmp_path, tiny_model_dir) -> None:
    calls = []
    monkeypatch.setattr(model_mod, "ensure_builtin_model",
                        lambda cache, public_texts: calls.append(list(public_texts)) or tiny_model_dir)
    monkeypatch.setattr(model_mod, "ensure_shape_model",
                        lambda cache, name, tokenizer_dir: cache / f"shape-{name}-{tokenizer_dir.name}")
    cfg = ModelConfig(name_or_path="builtin:shape:smollm2-135m", cache_dir=str(tmp_path))
    path = resolve_model_path(cfg, public_texts=lambda: ["some text"])
    assert path == str(tmp_path / f"shape-smollm2-135m-{tiny_model_dir.name}") and calls == [["some text"]]
