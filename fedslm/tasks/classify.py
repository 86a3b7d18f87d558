"""``classify``: a sequence-classification head on the base, trained with LoRA.

The head (PEFT's ``modules_to_save`` copy of ``score``/``classifier``) trains and
travels by the same role rule as LoRA (``fedslm.adapters.parameter_role``). A record is
``{"text": ..., "label": i}`` with ``i`` in ``0..num_labels-1``. Clients send their
confusion matrix (counts), never their own F1: the server sums the matrices and computes
accuracy and macro / per-class precision, recall and F1 exactly, with scikit-learn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fedslm.tasks.base import Batch, Metrics, Record, Task, batches, model_device, pad_right
from fedslm.tasks.registry import register_task

CONFUSION = "confusion"  # metric key: flattened [true, predicted] counts, row-major


def label_names(cfg) -> list[str]:
    """Class names: ``data.label_names``, or the synthetic corpus's topics, or 0..K-1."""
    if cfg.data.label_names:
        return list(cfg.data.label_names)
    if cfg.data.source == "synthetic":
        from fedslm.data.synthetic import TOPIC_NAMES

        return list(TOPIC_NAMES[: cfg.data.num_topics])
    if cfg.task.num_labels > 0:
        return [str(i) for i in range(cfg.task.num_labels)]
    from fedslm.data.federated import dataset_labels

    return list(dataset_labels(cfg.data))


def scores_from_confusion(matrix: Sequence[Sequence[int]], names: Sequence[str]) -> dict[str, float]:
    """Accuracy, macro and per-class P/R/F1 from a summed confusion matrix, by scikit-learn
    on the predictions the matrix counts (``sample_weight``), over the classes that occur
    as truth or prediction (scikit-learn's default; ``zero_division=0``)."""
    import numpy as np
    from sklearn.metrics import precision_recall_fscore_support

    cm = np.asarray(matrix, dtype=np.int64)
    true, pred = np.nonzero(cm)
    total = int(cm.sum())
    out = {"accuracy": float(np.trace(cm)) / total if total else 0.0}
    if total == 0:
        return out
    present = sorted(set(true.tolist()) | set(pred.tolist()))
    p, r, f, _ = precision_recall_fscore_support(true, pred, labels=present,
                                                 sample_weight=cm[true, pred], zero_division=0)
    out.update(macro_precision=float(p.mean()), macro_recall=float(r.mean()), macro_f1=float(f.mean()))
    for i, label in enumerate(present):
        name = names[label] if label < len(names) else str(label)
        out.update({f"precision_{name}": float(p[i]), f"recall_{name}": float(r[i]),
                    f"f1_{name}": float(f[i])})
    return out


class Classify(Task):
    name = "classify"
    peft_task_type = "SEQ_CLS"
    headline = "macro_f1"
    higher_is_better = True
    report_keys = ("accuracy", "macro_f1")

    def auto_model(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self, cfg) -> dict[str, Any]:
        return {"num_labels": num_labels(cfg)}

    def check(self, cfg) -> None:
        from fedslm.config import ConfigError

        if cfg.data.source == "shakespeare":
            raise ConfigError("task.name: classify needs labelled records; data.source=shakespeare "
                              "is unlabelled text")
        if cfg.personalization.method == "dual":
            raise ConfigError("personalization.method: dual cannot run with task.name=classify (PEFT "
                              "keeps one active copy of the head per model); use split, finetune "
                              "or local_only")
        if (cfg.federation.engine == "remote" and not cfg.data.label_names
                and cfg.task.num_labels == 0):
            raise ConfigError("task.num_labels: must be set (or data.label_names) with "
                              "federation.engine=remote: devices cannot infer the label set")
        if cfg.data.source not in ("synthetic",) and not cfg.data.label_key:
            raise ConfigError("data.label_key: is required for task.name=classify")

    # --- data -----------------------------------------------------------------------
    def dataset_records(self, dataset, data, *, where: str):
        from fedslm.data.core import DataError

        for key, value in (("data.text_key", data.text_key), ("data.label_key", data.label_key)):
            if value not in dataset.column_names:
                found = ", ".join(dataset.column_names) or "none"
                raise DataError(f"{key}: no column {value!r} in {where} (columns: {found})")
        mapping = label_mapping(dataset[data.label_key], data.label_names, where=where)
        texts, labels = dataset[data.text_key], dataset[data.label_key]
        records, keep = [], []
        for i, (text, label) in enumerate(zip(texts, labels)):
            if isinstance(text, str) and text.strip():
                keep.append(i)
                records.append(json.dumps({"text": text, "label": mapping[label]}))
        if not records:
            raise DataError(f"data.text_key: column {data.text_key!r} in {where} has no non-empty texts")
        dataset = dataset.select(keep) if len(keep) < len(dataset) else dataset
        if "text" in dataset.column_names:
            dataset = dataset.remove_columns("text")
        return dataset.add_column("text", records)

    def synthetic_records(self, documents, data, *, stream: str) -> tuple[Record, ...]:
        return tuple(json.dumps({"text": text, "label": topic}) for text, topic in documents)

    def encode(self, records: Sequence[Record], tokenizer: Any, cfg) -> Batch:
        import torch

        rows = [json.loads(r) for r in records]
        seq_len = cfg.training.seq_len
        eos = tokenizer.eos_token_id
        ids = [tokenizer(r["text"], add_special_tokens=False, verbose=False)["input_ids"][: seq_len - 1]
               + ([eos] if eos is not None else []) for r in rows]
        length = max(len(i) for i in ids)
        input_ids = pad_right(ids, pad=tokenizer.pad_token_id, length=length)
        mask = torch.zeros_like(input_ids)
        for i, row in enumerate(ids):
            mask[i, : len(row)] = 1
        labels = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
        return input_ids, mask, labels

    # --- loss -----------------------------------------------------------------------
    def loss(self, model, batch: Batch):
        return self.per_example_loss(model, batch).mean()

    def per_example_loss(self, model, batch: Batch):
        import torch.nn.functional as F

        ids, mask, labels = batch
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        return F.cross_entropy(logits, labels, reduction="none")

    def ghost_inputs(self, model, batch: Batch):
        ids, mask, labels = batch
        return model(input_ids=ids, attention_mask=mask).logits.float(), labels, None

    # --- evaluation -----------------------------------------------------------------
    def evaluate(self, model, tensors: Batch, *, batch_size: int, max_batches: int = 0) -> Metrics:
        import torch
        import torch.nn.functional as F

        k = model.config.num_labels if hasattr(model, "config") else None
        k = k or int(tensors[2].max()) + 1
        cm = torch.zeros(k, k, dtype=torch.long)
        loss_sum, n = 0.0, 0
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for ids, mask, labels in batches(tensors, batch_size, max_batches,
                                             device=model_device(model)):
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                pred = logits.argmax(-1)
                cm += torch.bincount(labels * k + pred, minlength=k * k).view(k, k).cpu()
                n += len(ids)
        model.train(was_training)
        own = scores_from_confusion(cm.tolist(), [str(i) for i in range(k)])
        return {"loss": loss_sum / n, "accuracy": own["accuracy"], "macro_f1": own.get("macro_f1", 0.0),
                CONFUSION: [int(v) for v in cm.flatten().tolist()], "num-examples": n}

    def pooled(self, rows: Sequence[dict[str, Any]], names: Sequence[str] | None = None) -> dict[str, float]:
        import numpy as np

        mats = [np.asarray(r[CONFUSION], dtype=np.int64) for r in rows if CONFUSION in r]
        if not mats:
            return {}
        total = np.sum(mats, axis=0)
        k = int(round(len(total) ** 0.5))
        names = list(names) if names and len(names) == k else [str(i) for i in range(k)]
        return scores_from_confusion(total.reshape(k, k).tolist(), names)


def label_mapping(values: Sequence[Any], names: Sequence[str], *, where: str) -> dict[Any, int]:
    """Label value -> class index. With ``data.label_names``, a value is a name or an index
    into them; otherwise the distinct values, sorted, are the classes."""
    from fedslm.data.core import DataError

    distinct = sorted({v for v in values if v is not None}, key=lambda v: (str(type(v)), v))
    if any(v is None for v in values):
        raise DataError(f"data.label_key: {sum(v is None for v in values)} records in {where} have no label")
    if not names:
        return {v: i for i, v in enumerate(distinct)}
    index = {name: i for i, name in enumerate(names)}
    mapping = {}
    for v in distinct:
        if str(v) in index:
            mapping[v] = index[str(v)]
        elif isinstance(v, int) and 0 <= v < len(names):
            mapping[v] = v
        else:
            raise DataError(f"data.label_names: label {v!r} in {where} is neither one of "
                            f"{', '.join(names)} nor an index 0..{len(names) - 1}")
    return mapping


def class_labels(cfg) -> tuple[str, ...]:
    """One name per head output, in index order: ``label_names``, or 0..K-1 when those
    do not cover the head (what a used or registered model prints)."""
    names = tuple(label_names(cfg))
    k = num_labels(cfg)
    return names if len(names) == k else tuple(map(str, range(k)))


def num_labels(cfg) -> int:
    """Classes of the run: ``data.label_names``, ``task.num_labels``, the synthetic topics,
    or the distinct labels of the whole dataset (simulation reads it anyway)."""
    if cfg.data.label_names:
        return len(cfg.data.label_names)
    if cfg.task.num_labels > 0:
        return cfg.task.num_labels
    if cfg.data.source == "synthetic":
        return cfg.data.num_topics
    from fedslm.data.federated import dataset_labels

    return len(dataset_labels(cfg.data))


register_task(Classify())
