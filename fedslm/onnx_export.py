"""ONNX export of a merged model, and an onnxruntime model that scores and generates.

The graph is written by torch's own exporter (``torch.onnx.export``, TorchScript path,
opset 17) and run by ``onnxruntime``: ``optimum``'s exporter would be the usual route,
but every ``optimum-onnx`` release requires ``transformers<4.58`` and this project runs
transformers 5.x, so pip would downgrade it. The graph maps ``input_ids`` and
``attention_mask`` (batch and length dynamic) to ``logits``; it has no key/value cache, so
each generated token recomputes the whole sequence (stated in the report). A ``classify``
model's graph maps the same inputs to ``logits`` [batch, classes] (the head reads the last
non-pad token, as in transformers). ``onnx`` and
``onnxruntime`` come with the ``export`` extra (``pip install 'fedslm[export]'``).
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ONNX_FILE = "model.onnx"
OPSET = 17
MARKER = "fedslm-export.json"


class OnnxError(ValueError):
    """ONNX export cannot run here; the one-line message says why."""


def missing_packages() -> str:
    """ "" when ONNX export can run here, else which package is missing."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    return ", ".join(missing)


class _Logits(torch.nn.Module):
    """The merged model as a plain tensor function: (ids, mask) -> logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def write_onnx(merged: Any, tokenizer: Any, out: Path, *, task: str = "causal_lm") -> Path:
    """``out/model.onnx`` plus the HF config and tokenizer; returns ``out``."""
    if missing_packages():
        raise OnnxError(f"--format onnx: needs {missing_packages()} (pip install 'fedslm[export]')")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = merged.float().cpu().eval()
    ids = torch.arange(4, 12).unsqueeze(0)
    dynamic = {"batch": 0, "length": 1}
    axes = {name: {i: f"{name}_{d}" for d, i in dynamic.items()} for name in ("input_ids", "attention_mask", "logits")}
    if task == "classify":  # logits [batch, classes]: no length axis
        axes["logits"] = {0: "logits_batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow in masks
        torch.onnx.export(
            _Logits(model),
            (ids, torch.ones_like(ids)),
            str(out / ONNX_FILE),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    merged.config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / MARKER).write_text(
        json.dumps(
            {
                "format": "onnx",
                "task": task,
                "exporter": f"torch.onnx.export (TorchScript, opset {OPSET})",
                "inputs": ["input_ids", "attention_mask"],
                "outputs": ["logits"],
                "kv_cache": False,
            },
            indent=2,
        )
    )
    return out


class OnnxModel(torch.nn.Module):
    """An onnxruntime session behind the call shape evaluation uses
    (``model(input_ids=..., attention_mask=...).logits``, ``model.config``)."""

    def __init__(self, path: Path, config: Any, *, threads: int = 1) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.config = config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> SimpleNamespace:
        ids = input_ids.cpu().numpy()
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).cpu().numpy()
        logits = self.session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        return SimpleNamespace(logits=torch.from_numpy(logits))


def load_onnx(out: Path, *, threads: int = 1) -> tuple[OnnxModel, Any]:
    from transformers import AutoConfig, AutoTokenizer

    out = Path(out)
    return (
        OnnxModel(out / ONNX_FILE, AutoConfig.from_pretrained(str(out)), threads=threads),
        AutoTokenizer.from_pretrained(str(out)),
    )


def greedy(model: OnnxModel, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``new_tokens`` greedy tokens after ``input_ids`` (the whole sequence each step)."""
    ids = input_ids
    for _ in range(new_tokens):
        nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, input_ids.shape[1] :]


def latency_per_token(
    model: OnnxModel, tokenizer: Any, *, prompt_tokens: int = 32, new_tokens: int = 32, runs: int = 5, threads: int = 1
) -> dict[str, Any]:
    """As ``fedslm.inference.latency_per_token`` (same prompt, median, one warm-up run),
    through onnxruntime on ``threads`` intra-op threads (the session's own setting)."""
    ids = torch.arange(prompt_tokens).remainder(len(tokenizer) - 8).add(4).unsqueeze(0)
    greedy(model, ids, new_tokens)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        greedy(model, ids, new_tokens)
        times.append((time.perf_counter() - start) / new_tokens)
    return {
        "seconds_per_token": statistics.median(times),
        "runs": runs,
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "device": "cpu",
        "note": "onnxruntime, no key/value cache: each token recomputes the sequence",
    }
