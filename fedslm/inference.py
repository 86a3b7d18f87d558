"""Using a trained model: assemble base + adapters the way they were trained, render a
prompt, generate (streamed), say what a completion means, time it.

Shared by the CLIs (``fedslm.simulations.generate`` / ``fedslm.simulations.export``), the device
agent (``fedslm-agent generate``) and the MLflow pyfunc model (``fedslm.mlflow_model``):
one way to build each model, so a generated text, an export and a registered version all
come from the same tensors the federated run evaluated.

Task-specific behaviour is behind two small functions, ``render_prompt`` (what the model
sees) and ``describe_output`` (what a completion means), each dispatching on the task
name, so a new task is one branch in each.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from fedslm.adapters import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, load_adapter_arrays,
                             reset_to_init)
from fedslm.config import PERSONALIZATION_METHODS, PeftConfig
from fedslm.device import model_device
from fedslm.model import build_peft_model, load_base_model

TASKS = ("causal_lm", "instruct", "classify")
GENERATIVE_TASKS = ("causal_lm", "instruct")
HEAD_MODULES = ("score", "classifier")  # sequence-classification heads (PEFT modules_to_save)
# Methods whose personal model also needs the global (shared) tensors; finetune's and
# local_only's personal adapters are complete on their own.
NEEDS_GLOBAL = ("split", "dual")


class InferenceError(ValueError):
    """A model cannot be assembled or used; the one-line message names what is wrong."""


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. ``temperature`` 0 is greedy; ``top_p`` < 1 is nucleus sampling."""

    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise InferenceError(f"--max-new-tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InferenceError(f"--temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InferenceError(f"--top-p: must be in (0, 1], got {self.top_p}")


# ---------------------------------------------------------------- adapters on disk

def read_adapter(adapter_dir: Path) -> tuple[dict[str, np.ndarray], PeftConfig, str]:
    """(tensors by checkpoint name, our LoRA config, base model path) of a PEFT adapter dir."""
    adapter_dir = Path(adapter_dir)
    config_file, weights = adapter_dir / ADAPTER_CONFIG_FILE, adapter_dir / ADAPTER_WEIGHTS_FILE
    if not config_file.is_file() or not weights.is_file():
        raise InferenceError(f"{adapter_dir}: not a PEFT adapter dir (no {ADAPTER_CONFIG_FILE} "
                             f"or {ADAPTER_WEIGHTS_FILE})")
    meta = json.loads(config_file.read_text())
    targets = meta.get("target_modules") or []
    peft_cfg = PeftConfig(r=int(meta["r"]), alpha=float(meta["lora_alpha"]),
                          dropout=float(meta.get("lora_dropout", 0.0)),
                          target_modules=sorted(targets) if isinstance(targets, list) else [targets],
                          bias=meta.get("bias", "none"))
    return dict(load_file(str(weights))), peft_cfg, str(meta.get("base_model_name_or_path") or "")


# ---------------------------------------------------------------- assembling a model

def head_size(*arrays: Mapping[str, np.ndarray] | None) -> int:
    """Classes of the sequence-classification head among these adapter tensors (0: none,
    a causal LM adapter): how a state dir alone says it holds a ``classify`` model."""
    for tensors in arrays:
        for name, value in (tensors or {}).items():
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in HEAD_MODULES and parts[-1] == "weight":
                return int(np.shape(value)[0])
    return 0


def assemble_model(base_path: str, peft_cfg: PeftConfig, *, method: str, dtype: str = "float32",
                   shared: Mapping[str, np.ndarray] | None,
                   personal: Mapping[str, np.ndarray] | None = None, seed: int = 0,
                   task: str = "causal_lm", num_labels: int = 0, device: str = "cpu"):
    """Base + LoRA built exactly as clients build it (``build_peft_model`` with ``method``
    and the task's model class: ``classify`` with a ``num_labels`` head), then: the global
    model (``personal`` None) = ``shared`` tensors with personal ones at their fresh init,
    as ``fedslm.client.personal`` evaluates it; the personal model = ``shared`` plus
    ``personal`` (finetune: ``personal`` is a whole fine-tuned copy of the adapter).
    Returns (PeftModel in eval mode on ``device``, tokenizer)."""
    from fedslm.tasks import get_task

    if method not in PERSONALIZATION_METHODS:
        raise InferenceError(f"personalization.method: unknown value {method!r}")
    if task not in TASKS:
        raise InferenceError(f"task: unknown value {task!r}; expected one of {', '.join(TASKS)}")
    spec = get_task(task)
    extra = {"num_labels": num_labels} if task == "classify" else {}
    base, tokenizer = load_base_model(base_path, dtype=dtype, auto_model=spec.auto_model(), **extra)
    model = build_peft_model(base, peft_cfg, personalization=method, task_type=spec.peft_task_type)
    try:
        if personal is not None and method == "finetune":
            load_adapter_arrays(model, personal, "shared")
        else:
            if shared is None and (personal is None or method in NEEDS_GLOBAL):
                raise InferenceError(f"a {method!r} model needs the global adapter")
            if shared is not None:
                load_adapter_arrays(model, shared, "shared")
            if personal is None:
                reset_to_init(model, "personal", seed=seed)
            else:
                load_adapter_arrays(model, personal, "personal")
    except ValueError as err:  # AdapterError: tensors that do not fit this model
        if isinstance(err, InferenceError):
            raise
        raise InferenceError(f"adapter does not fit a {method!r} model: {err}") from err
    model.eval()
    return model.to(device), tokenizer


def merged_model(model):
    """The plain transformers model with every active LoRA adapter merged in (a copy is
    not made: ``model`` is consumed)."""
    merged = model.merge_and_unload()
    merged.eval()
    return merged


# ---------------------------------------------------------------- task behaviour

def render_prompt(tokenizer, prompt: str, *, task: str = "causal_lm") -> str:
    """The text the model is given for a user's prompt.

    ``causal_lm``: the prompt as is (the model continues it). ``instruct``: one user turn
    rendered exactly as training rendered prompts (the tokenizer's chat template, else
    the documented default template of ``fedslm.tasks.instruct``), assistant turn opened.
    """
    if task == "causal_lm":
        return prompt
    if task == "instruct":
        from fedslm.tasks.instruct import render_prompt as render_instruct

        return render_instruct([{"role": "user", "content": prompt}], tokenizer)
    raise InferenceError(f"task: unknown value {task!r}; expected one of {', '.join(TASKS)}")


def describe_output(completion: str, *, task: str = "causal_lm") -> dict[str, object]:
    """What a completion means, as a small record a CLI prints and pyfunc returns.

    ``causal_lm`` / ``instruct``: the generated text itself (``classify`` does not
    generate: ``classify_text`` says what a text is).
    """
    if task in GENERATIVE_TASKS:
        return {"text": completion}
    raise InferenceError(f"task: unknown value {task!r}; expected one of {', '.join(TASKS)}")


def classify_text(model, tokenizer, text: str, labels: Sequence[str], *,
                  seq_len: int = 128) -> dict[str, object]:
    """The predicted label of ``text`` and its probability (softmax over the task head's
    logits), the text encoded exactly as ``fedslm.tasks.classify`` encodes a record for
    evaluation. ``labels`` names the head's classes in index order."""
    from fedslm.config import ExperimentConfig, TrainingConfig
    from fedslm.tasks import get_task

    if not text.strip():
        raise InferenceError("--prompt: must not be empty")
    cfg = ExperimentConfig(training=TrainingConfig(seq_len=seq_len))
    ids, mask, _ = get_task("classify").encode([json.dumps({"text": text, "label": 0})], tokenizer, cfg)
    with torch.no_grad():
        logits = model(input_ids=ids.to(model_device(model)),
                       attention_mask=mask.to(model_device(model))).logits.float()[0]
    probs = torch.softmax(logits, dim=-1).cpu()
    if len(labels) != len(probs):
        raise InferenceError(f"the task head has {len(probs)} classes, {len(labels)} label names given")
    best = int(probs.argmax())
    return {"label": labels[best], "index": best, "probability": float(probs[best]),
            "probabilities": {name: float(p) for name, p in zip(labels, probs.tolist())}}


# ---------------------------------------------------------------- generating

def generate(model, tokenizer, prompt: str, sampling: Sampling = Sampling(), *,
             task: str = "causal_lm", stream: bool = False, min_new_tokens: int = 0) -> str:
    """The completion of ``prompt`` (prompt excluded). ``stream`` prints tokens as they come
    (transformers' ``TextStreamer``). Sampling is reproducible from ``sampling.seed``."""
    from transformers import TextStreamer

    sampling.check()
    text = render_prompt(tokenizer, prompt, task=task)
    inputs = tokenizer(text, return_tensors="pt").to(model_device(model))
    if inputs["input_ids"].shape[1] == 0:
        raise InferenceError("--prompt: must not be empty")
    kwargs: dict[str, object] = {"max_new_tokens": sampling.max_new_tokens,
                                 "pad_token_id": tokenizer.pad_token_id}
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stream:
        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(sampling.seed)
        out = model.generate(**inputs, **kwargs)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def check_device(name: str) -> str:
    """``--device`` of the tools that use a model: cpu, or cuda where torch sees a GPU."""
    if name not in ("cpu", "cuda"):
        raise InferenceError(f"--device: unknown value {name!r}; expected cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise InferenceError("--device: cuda was requested but torch sees no CUDA GPU on this machine")
    return name


def latency_per_token(model, tokenizer, *, prompt_tokens: int = 32, new_tokens: int = 32,
                      runs: int = 5, threads: int = 1) -> dict[str, object]:
    """Median seconds per generated token over ``runs`` greedy generations of exactly
    ``new_tokens`` tokens after a ``prompt_tokens``-token prompt, on ``threads`` CPU
    threads (prefill included, one warm-up run not counted; on a GPU the clock waits
    for the device)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    ids = torch.arange(prompt_tokens).remainder(len(tokenizer) - 8).add(4).unsqueeze(0)
    ids = ids.to(model_device(model))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
    times = []
    try:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            for _ in range(runs):
                start = time.perf_counter()
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
                if ids.is_cuda:
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - start) / new_tokens)
    finally:
        torch.set_num_threads(previous)
    return {"seconds_per_token": statistics.median(times), "runs": runs, "threads": threads,
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "device": ids.device.type}
