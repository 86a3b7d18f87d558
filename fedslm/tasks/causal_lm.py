"""``causal_lm``: next-token prediction on plain text, packed into fixed-length blocks.

Packing: each text is tokenized without special tokens and followed by eos; the stream
is cut into consecutive ``training.seq_len`` blocks. Label masking: positions holding
``model.config.pad_token_id`` are not targets (with a tokenizer whose pad is its eos,
eos targets are masked too, as Hugging Face's collators do; the builtin tokenizer has a
distinct pad).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedslm.tasks.base import IGNORE_INDEX, Batch, Metrics, Record, Task, batches, model_device
from fedslm.tasks.registry import register_task

if TYPE_CHECKING:  # loaded lazily: the config check imports every task module
    import torch


def pack_texts(texts: Sequence[str], tokenizer, *, seq_len: int) -> torch.LongTensor:
    """Standard causal-LM packing into ``[N, seq_len]`` blocks.

    The tail shorter than a block is dropped; if the whole stream is shorter than one
    block it becomes one block right-padded with the pad id (masked from the loss).
    Zero tokens raise ValueError.
    """
    import torch

    if seq_len < 2:
        raise ValueError(f"pack_texts: seq_len must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("pack_texts: the tokenizer has no eos token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids: list[int] = []
    texts = [t for t in texts if t]
    if texts:
        for row in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            if row:
                ids.extend(row)
                ids.append(eos)
    if not ids:
        raise ValueError("pack_texts: too little text: the texts tokenize to zero tokens")
    n = len(ids) // seq_len
    if n == 0:
        return torch.tensor([ids + [pad] * (seq_len - len(ids))], dtype=torch.long)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def document_blocks(texts: Sequence[str], tokenizer, *, seq_len: int) -> torch.LongTensor:
    """One ``seq_len`` row per document (``privacy.unit=document``): its tokens and an eos,
    truncated to ``seq_len`` and right-padded with the pad id (masked from the loss).

    Unlike ``pack_texts`` no row holds two documents and no document spans two rows, so
    DP-SGD's per-example clip bounds each document's contribution to a step by C. A
    document longer than ``seq_len`` loses its tail. Empty texts are skipped.
    """
    import torch

    if seq_len < 2:
        raise ValueError(f"document_blocks: seq_len must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("document_blocks: the tokenizer has no eos token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    texts = [t for t in texts if t]
    rows = [row[: seq_len - 1] + [eos] if len(row) >= seq_len else row + [eos]
            for row in (tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else [])
            if row]
    if not rows:
        raise ValueError("document_blocks: too little text: the texts tokenize to zero tokens")
    return torch.tensor([r + [pad] * (seq_len - len(r)) for r in rows], dtype=torch.long)


def labels_for(blocks: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Targets for ``blocks``: the tokens themselves with pad positions set to -100."""
    if pad_token_id is None:
        return blocks
    return blocks.masked_fill(blocks == pad_token_id, IGNORE_INDEX)


def pad_id(model: torch.nn.Module) -> int | None:
    """``config.pad_token_id``, looking through wrappers (Opacus ``_module``, DDP ``module``)."""
    for candidate in (model, getattr(model, "_module", None), getattr(model, "module", None)):
        config = getattr(candidate, "config", None)
        if config is not None:
            return getattr(config, "pad_token_id", None)
    return None


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Each position's target is the next token; the last position has none (ignored).

    Shifting the labels instead of slicing the logits (as transformers does) keeps the
    logits contiguous, so flattening them copies nothing.
    """
    import torch.nn.functional as F

    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_ghost_inputs(model, input_ids, labels):
    """Flattened next-token logits and targets, one row of ``shape`` per sequence."""
    logits = model(input_ids=input_ids).logits.float()
    targets = next_token_targets(labels)
    return logits.reshape(-1, logits.size(-1)), targets.reshape(-1), targets.shape


def per_example_token_loss(model: torch.nn.Module, input_ids: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
    """``[B]``: each sequence's mean next-token loss over its own targets."""
    import torch.nn.functional as F

    logits = model(input_ids=input_ids).logits.float()
    targets = next_token_targets(labels)
    per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    mask = targets != IGNORE_INDEX
    return (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)


def token_statistics(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                     *, batch_size: int, max_batches: int = 0) -> Metrics:
    """Summed next-token loss, correct top-1 predictions and target count, in order."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    loss_sum, correct, tokens, examples = 0.0, 0, 0, 0
    for ids, labs in batches((input_ids, labels), batch_size, max_batches,
                             device=model_device(model)):
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1].float()
        targets = labs[:, 1:]
        mask = targets != IGNORE_INDEX
        loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                          reduction="sum", ignore_index=IGNORE_INDEX))
        correct += int(((logits.argmax(-1) == targets) & mask).sum())
        tokens += int(mask.sum())
        examples += len(ids)
    model.train(was_training)
    if tokens == 0:
        raise ValueError("evaluate: no target tokens to evaluate")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / tokens,
            "num-examples": examples, "num-tokens": tokens}


class CausalLM(Task):
    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    headline = "perplexity"
    higher_is_better = False
    report_keys = ("perplexity",)

    def dataset_records(self, dataset, data, *, where: str):
        from fedslm.data.sources import text_column

        return text_column(dataset, data.text_key, where=where)

    def synthetic_records(self, documents, data, *, stream: str) -> tuple[Record, ...]:
        return tuple(text for text, _ in documents)

    def encode(self, records: Sequence[Record], tokenizer: Any, cfg) -> Batch:
        return (pack_texts(records, tokenizer, seq_len=cfg.training.seq_len),)

    def loss(self, model, batch: Batch) -> torch.Tensor:
        (ids,) = batch
        return model(input_ids=ids, labels=labels_for(ids, pad_id(model))).loss

    def per_example_loss(self, model, batch: Batch) -> torch.Tensor:
        (ids,) = batch
        return per_example_token_loss(model, ids, labels_for(ids, pad_id(model)))

    def ghost_inputs(self, model, batch: Batch):
        (ids,) = batch
        return token_ghost_inputs(model, ids, labels_for(ids, pad_id(model)))

    def evaluate(self, model, tensors: Batch, *, batch_size: int, max_batches: int = 0) -> Metrics:
        (ids,) = tensors
        return token_statistics(model, ids, labels_for(ids, pad_id(model)),
                                batch_size=batch_size, max_batches=max_batches)


register_task(CausalLM())
