"""What a model says about texts: per-text negative log-likelihood, and the two attacks.

Each text is scored as it appears in training, between end-of-sequence tokens
(``pack_texts`` puts an eos after every text): ``[eos] text [eos]``, every token after
the first a target. Long texts are cut to the model's context.

- **loss threshold** (Yeom et al., CSF 2018): member score = minus the text's mean
  per-token loss under the audited model.
- **calibrated** (reference model; Watson et al., ICLR 2022; Carlini et al., S&P 2022):
  member score = reference loss minus audited loss, so texts that are simply easy for
  any model of the language stop looking like members. The reference here is the same
  base model with the adapter switched off: it never saw a client's texts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def text_nll(model: torch.nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 16,
             max_tokens: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL in nats, number of target tokens) per text, in order."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = [[eos, *ids[: max_tokens - 2], eos]
            for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]
    sums, counts = np.zeros(len(rows)), np.zeros(len(rows), dtype=np.int64)
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(chunk):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-100)
        sums[start:start + len(chunk)] = loss.sum(1).numpy()
        counts[start:start + len(chunk)] = (targets != -100).sum(1).numpy()
    model.train(was_training)
    return sums, counts


def mean_nll(model: torch.nn.Module, tokenizer, texts: Sequence[str], **kwargs) -> np.ndarray:
    sums, counts = text_nll(model, tokenizer, texts, **kwargs)
    return sums / np.maximum(counts, 1)


def loss_scores(audited_nll: np.ndarray) -> np.ndarray:
    """Loss-threshold attack: lower loss => more likely a member."""
    return -np.asarray(audited_nll, dtype=float)


def calibrated_scores(audited_nll: np.ndarray, reference_nll: np.ndarray) -> np.ndarray:
    """Reference-calibrated attack: how much lower the audited loss is than the reference's."""
    return np.asarray(reference_nll, dtype=float) - np.asarray(audited_nll, dtype=float)
