"""Using a ``classify`` model outside training: its logits over labelled records, their
quality by scikit-learn, CPU latency per text, class names carried by an export, and why
GGUF has no place for its head.

Shared by ``fedslm.simulations.export`` (quality before and after export) and the export
bench; every text is encoded exactly as ``fedslm.tasks.classify`` encodes it for
evaluation (cut to ``seq_len`` - 1 tokens, eos appended, right-padded).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedslm.device import model_device

# Where llama.cpp puts a classifier: gguf's per-architecture tensor lists give
# ``cls`` / ``cls.output`` only to BERT-family encoders (``classifier_place``).
GGUF_NO_HEAD = (
    "--format gguf: a classify model has a sequence-classification head, and llama.cpp's "
    "GGUF conventions have no place for it in a {arch!r} model (classifier tensors "
    "cls/cls.output exist only for BERT-family architectures); use hf, int8 or onnx"
)


def classifier_place(arch: str) -> bool:
    """Whether gguf's tensor list for ``arch`` (e.g. ``llama``) has a classifier output."""
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS

    by_name = {name: arch_id for arch_id, name in MODEL_ARCH_NAMES.items()}
    return arch in by_name and MODEL_TENSOR.CLS_OUT in MODEL_TENSORS[by_name[arch]]


def encode_texts(records: Sequence[str], tokenizer: Any, *, seq_len: int) -> tuple[torch.Tensor, ...]:
    """(ids, attention mask, labels) of ``{"text", "label"}`` records, as evaluation encodes them."""
    from fedslm.config import ExperimentConfig, TrainingConfig
    from fedslm.tasks import get_task

    return get_task("classify").encode(
        list(records), tokenizer, ExperimentConfig(training=TrainingConfig(seq_len=seq_len))
    )


def record_logits(
    model: Any, tokenizer: Any, records: Sequence[str], *, seq_len: int, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 logits [N, classes], true labels [N]) of ``records``, in batches."""
    ids, mask, labels = encode_texts(records, tokenizer, seq_len=seq_len)
    device = model_device(model)
    out = []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            sl = slice(start, start + batch_size)
            logits = model(input_ids=ids[sl].to(device), attention_mask=mask[sl].to(device)).logits
            out.append(logits.float().cpu())
    return torch.cat(out).numpy(), labels.numpy()


def quality(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Cross-entropy, accuracy and macro precision / recall / F1 (scikit-learn, over the
    classes that occur as truth or prediction, ``zero_division=0``: as the run's own
    central metrics) of the argmax predictions."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    pred = logits.argmax(-1)
    p, r, f, _ = precision_recall_fscore_support(labels, pred, average="macro", zero_division=0)
    log_probs = torch.log_softmax(torch.from_numpy(logits), dim=-1)
    loss = float(-log_probs[torch.arange(len(labels)), torch.from_numpy(labels)].mean())
    return {
        "loss": loss,
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_precision": float(p),
        "macro_recall": float(r),
        "macro_f1": float(f),
        "examples": int(len(labels)),
    }


def latency_per_text(
    model: Any, tokenizer: Any, *, text_tokens: int = 32, runs: int = 5, threads: int = 1
) -> dict[str, Any]:
    """Median seconds of one forward pass over one ``text_tokens``-token text (the label
    and its probability need nothing more), on ``threads`` CPU threads, one warm-up run
    not counted. An onnxruntime model uses its session's own thread setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    ids = torch.arange(text_tokens).remainder(len(tokenizer) - 8).add(4).unsqueeze(0)
    ids = ids.to(model_device(model))
    times = []
    try:
        with torch.no_grad():
            for i in range(runs + 1):
                start = time.perf_counter()
                torch.softmax(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, -1)
                if ids.is_cuda:
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return {
        "seconds_per_text": statistics.median(times),
        "runs": runs,
        "threads": threads,
        "text_tokens": text_tokens,
        "device": ids.device.type,
    }


def name_labels(config: Any, labels: Sequence[str]) -> None:
    """Write the run's class names into a model config (``id2label`` / ``label2id``), so a
    plain transformers user of the export reads names, not ``LABEL_i``."""
    if labels and len(labels) == config.num_labels:
        config.id2label = {i: str(name) for i, name in enumerate(labels)}
        config.label2id = {str(name): i for i, name in enumerate(labels)}
