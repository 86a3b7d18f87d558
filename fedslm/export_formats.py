"""Writing a merged model in deployable formats, and reading each one back.

* ``hf``: ``save_pretrained`` of the merged model + tokenizer; plain
  ``AutoModelForCausalLM.from_pretrained`` loads it, no PEFT anywhere.
* ``int8``: torch dynamic quantization (``torch.ao.quantization.quantize_dynamic``: int8
  weights, activations quantized per batch at run time) of every ``nn.Linear``; saved as
  the HF config + tokenizer + the quantized state dict, loaded by rebuilding the model from
  the config and quantizing it the same way before loading the weights.
* ``gguf``: ``fedslm.gguf_export`` (llama.cpp's file format).

A ``classify`` model is a sequence-classification model (its head merged in): the marker
file names the task, and the loaders rebuild it as ``AutoModelForSequenceClassification``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

INT8_WEIGHTS = "model_int8.pt"
EXPORT_MARKER = "fedslm-export.json"


def dir_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def auto_class(task: str):
    """The transformers Auto class an export of a ``task`` model loads with."""
    import transformers

    return (transformers.AutoModelForSequenceClassification if task == "classify"
            else transformers.AutoModelForCausalLM)


def exported_task(out: Path) -> str:
    """The task an export dir was written for (its marker; older exports: causal_lm)."""
    marker = Path(out) / EXPORT_MARKER
    return json.loads(marker.read_text()).get("task", "causal_lm") if marker.is_file() else "causal_lm"


def save_hf(merged, tokenizer, out: Path, *, task: str = "causal_lm") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / EXPORT_MARKER).write_text(json.dumps({"format": "hf", "task": task}, indent=2))
    return out


def load_hf(out: Path):
    """Plain transformers, on purpose: an exported model needs no PEFT."""
    from transformers import AutoTokenizer

    model = auto_class(exported_task(out)).from_pretrained(str(out), dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(out))


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of every Linear (in place; returns the quantized model)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        model = quantize_dynamic(model.float().eval(), {torch.nn.Linear}, dtype=torch.qint8,
                                 inplace=True)
    return model


def save_int8(merged, tokenizer, out: Path, *, task: str = "causal_lm") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    merged.config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    torch.save(quantize_int8(merged).state_dict(), out / INT8_WEIGHTS)
    (out / EXPORT_MARKER).write_text(json.dumps(
        {"format": "int8", "task": task, "method": "torch.ao.quantization.quantize_dynamic",
         "quantized_modules": ["torch.nn.Linear"], "weights": INT8_WEIGHTS}, indent=2))
    return out


def load_int8(out: Path):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(out))
    model = quantize_int8(auto_class(exported_task(out)).from_config(config, dtype=torch.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = torch.load(out / INT8_WEIGHTS, weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(out))
