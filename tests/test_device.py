"""Device, precision, gradient checkpointing, quantized base: what this machine can do is
checked before anything starts, and what runs on CPU is tested on CPU; CUDA and
bitsandbytes paths are skipped (not failed) where absent."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedslm import device as device_mod
from fedslm.adapters import adapter_arrays, from_array_record, to_array_record
from fedslm.client.app import app, experiment
from fedslm.training import make_training_setup, pack_texts, run_steps, train_local
from fedslm.config import ConfigError, ExperimentConfig, PeftConfig, TrainingConfig
from fedslm.device import check_machine, resolve_device
from fedslm.model import build_peft_model, load_base_model, prepare_for_training
from fedslm.runconfig import to_run_config
from fedslm.server.experiment import initial_adapter
from fedslm.server.strategy import screen_train_replies
from tests.test_client_app import _message

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
needs_bnb = pytest.mark.skipif(not (HAS_CUDA and device_mod.bitsandbytes_available()),
                               reason="needs a CUDA GPU and bitsandbytes")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "mps_available", lambda: False)


def _cfg(**sections) -> ExperimentConfig:
    return ExperimentConfig.from_dict(sections)


# --- resolution and refusals ---------------------------------------------------------


def test_device_resolution_without_cuda(no_gpu) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda")
    assert str(err.value) == ("training.device: cuda was requested but torch sees no CUDA GPU on "
                              "this machine (use training.device=auto or cpu)")
    with pytest.raises(ConfigError, match=r"^training.device: mps was requested but this machine "
                                          r"has no Apple MPS backend"):
        resolve_device("mps")


def test_auto_is_cuda_when_present(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize(("sections", "expected"), [
    ({"training": {"device": "cuda"}}, "training.device: cuda was requested but torch sees no CUDA GPU"),
    ({"training": {"precision": "fp16"}}, "training.precision: fp16 needs a GPU (CPU autocast "
                                          "computes in bfloat16 only); use bf16 or fp32"),
    ({"model": {"quantization": "4bit"}}, "model.quantization: 4bit needs a CUDA GPU "
                                          "(bitsandbytes); this run's device is cpu"),
    ({"model": {"quantization": "8bit"}, "training": {"device": "cpu"}},
     "model.quantization: 8bit needs a CUDA GPU (bitsandbytes); this run's device is cpu"),
])
def test_machine_refuses_what_it_cannot_do(no_gpu, sections, expected) -> None:
    with pytest.raises(ConfigError) as err:
        check_machine(_cfg(**sections))
    assert str(err.value).startswith(expected)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("sections", "can_refuse"), [
    ({}, False),
    ({"training": {"device": "cpu", "precision": "bf16"}}, False),
    ({"training": {"device": "cuda"}}, True),
    ({"training": {"device": "mps"}}, True),
    ({"training": {"precision": "fp16"}}, True),
    ({"training": {"device": "cpu", "precision": "fp16"}}, True),
    ({"model": {"quantization": "8bit"}}, True),
])
def test_the_launcher_imports_torch_only_for_a_config_some_machine_refuses(
        no_gpu, monkeypatch, sections, can_refuse) -> None:
    """``refuse_unsupported`` asks the machine (``check_machine``) exactly where a refusal
    is possible, and then refuses as ``check_machine`` does."""
    cfg, asked = _cfg(**sections), []
    monkeypatch.setattr(device_mod, "check_machine", lambda c: asked.append(c) or device_mod.resolve_device("cpu"))
    device_mod.refuse_unsupported(cfg)
    assert device_mod.machine_can_refuse(cfg) is can_refuse
    assert asked == ([cfg] if can_refuse else [])


def test_refuse_unsupported_refuses_what_check_machine_does(no_gpu) -> None:
    with pytest.raises(ConfigError, match="^training.device: cuda was requested but torch sees no CUDA GPU"):
        device_mod.refuse_unsupported(_cfg(training={"device": "cuda"}))


def test_quantization_without_bitsandbytes_is_named(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device_mod, "bitsandbytes_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        check_machine(_cfg(model={"quantization": "4bit"}))
    assert str(err.value) == ("model.quantization: 4bit needs the bitsandbytes package "
                              "(pip install bitsandbytes)")


def test_cpu_machine_accepts_bf16_and_checkpointing(no_gpu) -> None:
    cfg = _cfg(training={"precision": "bf16", "gradient_checkpointing": True})
    assert check_machine(cfg) == torch.device("cpu")


@pytest.mark.parametrize(("sections", "expected"), [
    ({"training": {"device": "tpu"}}, "training.device: unknown value 'tpu'; expected one of auto, cpu, cuda, mps"),
    ({"training": {"precision": "fp8"}}, "training.precision: unknown value 'fp8'; expected one of fp32, bf16, fp16"),
    ({"model": {"quantization": "2bit"}}, "model.quantization: unknown value '2bit'; expected one of none, 8bit, 4bit"),
    ({"model": {"name_or_path": "builtin:shape:llama-70b"}},
     "model.name_or_path: unknown value 'builtin:shape:llama-70b'; expected one of "
     "builtin:shape:smollm2-135m, builtin:shape:qwen2.5-0.5b"),
    ({"privacy": {"mode": "dp_sgd"}, "model": {"quantization": "4bit"}},
     "model.quantization: 4bit cannot be used with privacy.mode=dp_sgd: Opacus computes "
     "per-example gradients only for float layers it knows, not for bitsandbytes' quantized ones"),
    ({"privacy": {"mode": "dp_sgd"}, "training": {"precision": "fp16"}},
     "training.precision: fp16 cannot be used with privacy.mode=dp_sgd: the gradient scaler "
     "rescales gradients after Opacus has clipped and noised them per example (use bf16 or fp32)"),
    ({"privacy": {"mode": "dp_sgd"}, "training": {"gradient_checkpointing": True}},
     "training.gradient_checkpointing: cannot be used with privacy.mode=dp_sgd: recomputing the "
     "forward pass records every activation twice in Opacus's hooks"),
])
def test_schema_refuses_bad_values_and_combinations(sections, expected) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(**sections)
    assert str(err.value) == expected


def test_agent_device_overrides_the_run_config_on_that_node() -> None:
    cfg = _cfg(training={"device": "auto"})
    ctx = Context(run_id=1, node_id=5, node_config={"device": "cpu"}, state=RecordDict(),
                  run_config=to_run_config(cfg))
    assert experiment(ctx).training.device == "cpu"
    plain = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config=to_run_config(cfg))
    assert experiment(plain).training.device == "auto"


# --- precision and checkpointing on CPU -------------------------------------------------


def _train(make_peft, tiny_base, sentences, **training):
    model = make_peft(seed=0)
    before = adapter_arrays(model)
    blocks = pack_texts(sentences, tiny_base[1], seq_len=16)[:16]
    cfg = TrainingConfig(learning_rate=0.01, local_steps=4, batch_size=4, warmup_ratio=0.0, **training)
    result = train_local(model, blocks, cfg, generator_seed=3)
    return model, before, result


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_on_cpu_trains_float32_lora(make_peft, tiny_base, sentences, precision) -> None:
    """fp16 is refused on CPU by the machine check, but its scaler path runs here too."""
    fp32_model, _, fp32 = _train(make_peft, tiny_base, sentences)
    model, before, result = _train(make_peft, tiny_base, sentences, precision=precision)
    assert result.steps == 4 and np.isfinite(result.loss)
    assert result.loss != fp32.loss  # autocast really computed in low precision ...
    assert abs(result.loss - fp32.loss) < 0.05  # ... and trained the same model
    after = adapter_arrays(model)
    assert all(after[n].dtype == np.float32 for n in after)
    assert any(not np.array_equal(after[n], before[n]) for n in after if "lora_B" in n)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def _gc_model(tiny_model_dir: Path, *, checkpointing: bool):
    base, _ = load_base_model(str(tiny_model_dir), dtype="float32")
    base = prepare_for_training(base, gradient_checkpointing=checkpointing, quantized=False)
    torch.manual_seed(0)
    return build_peft_model(base, PeftConfig(dropout=0.0))


def test_gradient_checkpointing_gives_the_same_loss_and_trains(tiny_model_dir, tiny_base, sentences) -> None:
    blocks = pack_texts(sentences, tiny_base[1], seq_len=16)[:16]
    cfg = TrainingConfig(learning_rate=0.01, local_steps=3, batch_size=4, warmup_ratio=0.0)
    plain, ckpt = _gc_model(tiny_model_dir, checkpointing=False), _gc_model(tiny_model_dir, checkpointing=True)
    assert ckpt.base_model.model.is_gradient_checkpointing and not plain.base_model.model.is_gradient_checkpointing
    before = adapter_arrays(ckpt)
    results = [run_steps(make_training_setup(m, blocks, cfg, generator_seed=1)) for m in (plain, ckpt)]
    assert results[1].loss == pytest.approx(results[0].loss, rel=1e-5)
    after_plain, after_ckpt = adapter_arrays(plain), adapter_arrays(ckpt)
    assert any(not np.array_equal(after_ckpt[n], before[n]) for n in before if "lora_B" in n)
    for name in before:
        np.testing.assert_allclose(after_ckpt[name], after_plain[name], rtol=1e-4, atol=1e-6)


# --- precisions meet on the wire and in aggregation ---------------------------------------


@pytest.fixture(scope="module")
def run_cfgs(tmp_path_factory) -> tuple[ExperimentConfig, ExperimentConfig]:
    common = {"federation": {"num_clients": 2}, "training": {"local_steps": 2},
              "data": {"docs_per_client": 8}, "output_dir": str(tmp_path_factory.mktemp("run"))}
    fp32 = ExperimentConfig.from_dict(common)
    bf16 = dataclasses.replace(fp32, model=dataclasses.replace(fp32.model, dtype="bfloat16"),
                               training=dataclasses.replace(fp32.training, precision="bf16"))
    return fp32, bf16


def _context(cfg: ExperimentConfig, partition: int) -> Context:
    return Context(run_id=1, node_id=11 + partition, node_config={"partition-id": partition,
                   "num-partitions": 2}, state=RecordDict(), run_config=to_run_config(cfg))


def test_a_bf16_client_sends_float32_and_mixed_precisions_aggregate(run_cfgs) -> None:
    fp32_cfg, bf16_cfg = run_cfgs
    sent = to_array_record(initial_adapter(fp32_cfg))
    replies = [app(_message("train", sent), _context(cfg, partition))
               for partition, cfg in enumerate((fp32_cfg, bf16_cfg))]
    updates = [from_array_record(r.content.array_records["arrays"]) for r in replies]
    assert all(v.dtype == np.float32 for u in updates for v in u.values())
    screened = screen_train_replies(replies, sent)
    assert len(screened.accepted) == 2 and not screened.rejected
    weights = [int(r.content.metric_records["metrics"]["num-examples"]) for r in replies]
    arrays, _ = FedAvg().aggregate_train(1, screened.accepted)
    for name in sent:
        expected = (weights[0] * updates[0][name] + weights[1] * updates[1][name]) / sum(weights)
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=1e-6, atol=1e-8)
        assert arrays[name].numpy().dtype == np.float32


# --- GPU only (skipped on CPU machines, CI included) -----------------------------------


@needs_cuda
def test_training_on_cuda_moves_model_and_batches(tiny_model_dir, tiny_base, sentences) -> None:
    base, _ = load_base_model(str(tiny_model_dir), dtype="float32")
    torch.manual_seed(0)
    model = build_peft_model(base, PeftConfig(dropout=0.0)).to("cuda")
    before = adapter_arrays(model)
    blocks = pack_texts(sentences, tiny_base[1], seq_len=16)[:16]
    cfg = TrainingConfig(learning_rate=0.01, local_steps=3, batch_size=4, precision="bf16")
    result = train_local(model, blocks, cfg, generator_seed=0)
    after = adapter_arrays(model)
    assert np.isfinite(result.loss) and all(v.dtype == np.float32 for v in after.values())
    assert any(not np.array_equal(after[n], before[n]) for n in after if "lora_B" in n)


@needs_bnb
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_base_trains_lora_on_cuda(tiny_model_dir, tiny_base, sentences, quantization) -> None:
    kwargs = device_mod.quantization_kwargs(quantization, torch.device("cuda"))
    base, _ = load_base_model(str(tiny_model_dir), dtype="float32", **kwargs)
    base = prepare_for_training(base, gradient_checkpointing=True, quantized=True)
    model = build_peft_model(base, PeftConfig(dropout=0.0))
    before = adapter_arrays(model)
    blocks = pack_texts(sentences, tiny_base[1], seq_len=16)[:16]
    result = train_local(model, blocks, TrainingConfig(learning_rate=0.01, local_steps=3, batch_size=4,
                                                       precision="bf16"), generator_seed=0)
    after = adapter_arrays(model)
    assert np.isfinite(result.loss) and all(v.dtype == np.float32 for v in after.values())
    assert any(not np.array_equal(after[n], before[n]) for n in after if "lora_B" in n)
