"""fedslm.adapters: the trainable/travel rule, array packing, strict loading, atomic saving."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from fedslm import adapters
from fedslm.adapters import (
    AdapterError,
    adapter_arrays,
    from_array_record,
    load_adapter_arrays,
    parameter_role,
    payload_bytes,
    save_adapter,
    to_array_record,
)
from fedslm.config import PeftConfig
from fedslm.model import build_peft_model, load_base_model
from tests.conftest import TINY

Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("name", "bias", "role"),
    [
        (f"{Q}.lora_A.default.weight", "none", "shared"),  # parameter name
        (f"{Q}.lora_B.weight", "none", "shared"),  # checkpoint name
        ("base_model.model.model.embed_tokens.lora_embedding_A", "none", "shared"),
        ("base_model.model.model.embed_tokens.lora_embedding_B.default", "none", "shared"),
        (f"{Q}.base_layer.weight", "all", "frozen"),
        ("base_model.model.model.embed_tokens.weight", "none", "frozen"),
        ("base_model.model.lm_head.weight", "all", "frozen"),
        ("base_model.model.model.norm.weight", "none", "frozen"),
        (f"{Q}.base_layer.bias", "none", "frozen"),
        (f"{Q}.base_layer.bias", "lora_only", "shared"),
        ("base_model.model.model.layers.0.self_attn.k_proj.bias", "lora_only", "frozen"),
        ("base_model.model.model.layers.0.self_attn.k_proj.bias", "all", "shared"),
        ("base_model.model.model.layers.0.lora_Anything.weight", "none", "frozen"),  # whole parts only
    ],
)
def test_parameter_role(name, bias, role):
    assert parameter_role(name, bias=bias) == role


def _randomize(model: PeftModel, seed: int) -> dict[str, np.ndarray]:
    """Give every adapter tensor (B starts at zero) distinct random values."""
    rng = np.random.default_rng(seed)
    arrays = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in adapter_arrays(model).items()}
    load_adapter_arrays(model, arrays)
    return arrays


def test_adapter_arrays_are_exactly_the_trainable_lora_tensors(make_peft, tmp_path):
    model = make_peft(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    arrays = adapter_arrays(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.replace(".default.", ".") for n in trainable} == set(arrays)
    assert len(arrays) == 2 * 3 * 2  # layers x targets x (A, B)
    assert all(".lora_A." in n or ".lora_B." in n for n in arrays)
    assert all(a.dtype == np.float32 for a in arrays.values())
    # Same names as PEFT's own checkpoint file.
    model.save_pretrained(str(tmp_path))
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == set(arrays)
    # Copies, not views into the model.
    name = next(iter(arrays))
    arrays[name][...] = 123.0
    assert not np.array_equal(adapter_arrays(model)[name], arrays[name])


@pytest.mark.parametrize(("bias", "expected_biases"), [("lora_only", 4), ("all", 8)])
def test_bias_modes_agree_with_peft(bias, expected_biases):
    # A Llama with projection biases, so that bias modes have something to act on.
    config = LlamaConfig(vocab_size=64, attention_bias=True, pad_token_id=0, **TINY)
    torch.manual_seed(0)
    model = build_peft_model(
        LlamaForCausalLM(config), PeftConfig(target_modules=["q_proj", "v_proj"], bias=bias)
    )
    arrays = adapter_arrays(model)  # raises if PEFT, the rule and requires_grad disagree
    biases = [n for n in arrays if n.endswith(".bias")]
    assert len(biases) == expected_biases  # lora_only: q,v per layer; all: q,k,v,o per layer
    assert model.get_parameter(f"{Q}.base_layer.bias").requires_grad


def test_rule_disagreement_fails_loudly(make_peft):
    model = make_peft()
    model.base_model.model.model.norm.weight.requires_grad_(True)  # a base weight starts training
    with pytest.raises(AdapterError, match="norm.weight"):
        adapter_arrays(model)


def test_array_record_round_trip(make_peft):
    arrays = _randomize(make_peft(), seed=1)
    arrays["extra.float16"] = np.arange(6, dtype=np.float16).reshape(2, 3)
    record = to_array_record(arrays)
    back = from_array_record(record)
    assert list(back) == list(arrays)
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        assert np.array_equal(back[name], value)
    assert payload_bytes(record) == sum(len(a.data) for a in record.values())
    assert payload_bytes(record) >= sum(v.nbytes for v in arrays.values())
    assert payload_bytes(to_array_record({})) == 0


def test_load_adapter_arrays_copies_in_place(make_peft):
    source, target = make_peft(seed=1), make_peft(seed=2)
    arrays = _randomize(source, seed=3)
    before = [p for n, p in target.named_parameters() if "lora_A" in n][0]
    load_adapter_arrays(target, arrays)
    after = [p for n, p in target.named_parameters() if "lora_A" in n][0]
    assert before is after  # same Parameter objects: optimizers keep working
    got = adapter_arrays(target)
    assert all(np.array_equal(got[n], arrays[n]) for n in arrays)


def _bad(arrays, kind):
    arrays = dict(arrays)
    name = sorted(arrays)[1]
    if kind == "missing":
        del arrays[name]
    elif kind == "extra":
        name = "base_model.model.model.norm.weight"
        arrays[name] = np.zeros(64, np.float32)
    elif kind == "shape":
        arrays[name] = np.zeros((3, 3), np.float32)
    elif kind == "nan":
        arrays[name] = arrays[name].copy()
        arrays[name].flat[0] = np.nan
    elif kind == "inf":
        arrays[name] = arrays[name].copy()
        arrays[name].flat[-1] = np.inf
    return arrays, name


@pytest.mark.parametrize(
    ("kind", "says"),
    [("missing", "missing"), ("extra", "not an adapter tensor"), ("shape", "shape (3, 3)"),
     ("nan", "non-finite"), ("inf", "non-finite")],
)
def test_load_adapter_arrays_is_strict_and_names_the_tensor(make_peft, kind, says):
    model = make_peft()
    good = adapter_arrays(model)
    arrays, name = _bad(_randomize(make_peft(seed=5), seed=5), kind)
    with pytest.raises(AdapterError) as err:
        load_adapter_arrays(model, arrays)
    message = str(err.value)
    assert message.startswith(f"{name}: ") and says in message and "\n" not in message
    now = adapter_arrays(model)  # nothing was copied: checks run before any write
    assert all(np.array_equal(now[n], good[n]) for n in good)


def test_save_adapter_loads_with_peft(make_peft, tiny_model_dir, tmp_path):
    peft_cfg = PeftConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = make_peft(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    arrays = _randomize(model, seed=7)
    out = save_adapter(arrays, peft_cfg, base_model=str(tiny_model_dir), out_dir=tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")

    fresh, _ = load_base_model(str(tiny_model_dir), dtype="float32")
    loaded = PeftModel.from_pretrained(fresh, str(out))
    got = {
        n: p.detach().numpy()
        for n, p in adapters.get_peft_model_state_dict(loaded, save_embedding_layers=False).items()
    }
    assert set(got) == set(arrays)
    assert all(np.array_equal(got[n], arrays[n]) for n in arrays)
    # And the loaded adapter computes what the original does.
    ids = torch.arange(1, 17).view(1, 16)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5)


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_failed_save_leaves_old_adapter_intact(make_peft, tiny_model_dir, tmp_path, monkeypatch):
    peft_cfg = PeftConfig(dropout=0.0)
    model = make_peft()
    out = tmp_path / "adapter"
    save_adapter(_randomize(model, seed=1), peft_cfg, base_model="b", out_dir=out)
    old = _snapshot(out)

    nan_arrays, name = _bad(_randomize(model, seed=2), "nan")
    with pytest.raises(AdapterError, match=name):
        save_adapter(nan_arrays, peft_cfg, base_model="b", out_dir=out)
    assert _snapshot(out) == old

    def crash_mid_write(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(_randomize(model, seed=3), peft_cfg, base_model="b", out_dir=out)
    assert _snapshot(out) == old
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp dirs left behind


def test_save_adapter_replaces_a_good_one(make_peft, tmp_path):
    peft_cfg = PeftConfig(dropout=0.0)
    model = make_peft()
    out = tmp_path / "adapter"
    save_adapter(_randomize(model, seed=1), peft_cfg, base_model="b", out_dir=out)
    second = _randomize(model, seed=2)
    save_adapter(second, peft_cfg, base_model="b", out_dir=out)
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert all(np.array_equal(saved[n], second[n]) for n in second)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_replace_dir_fallback_without_renameat2(tmp_path, monkeypatch):
    src, dst = tmp_path / "new", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_text("new")
    (dst / "f").write_text("old")

    class NoRenameat2:
        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setattr(adapters.ctypes, "CDLL", NoRenameat2)
    adapters._replace_dir(src, dst)
    assert (dst / "f").read_text() == "new" and (src / "f").read_text() == "old"
