"""privacy.unit: the DP-SGD record for text is a packed block (default) or one document.

With ``document`` a document is one row, so Opacus's per-example clip bounds its
contribution to any step's sum by C; packed, a document spanning k blocks can move the
sum by up to k*C. Real Opacus on the tiny PEFT Llama.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedslm.client.dp_sgd import make_private
from fedslm.client.records import client_tensors
from fedslm.training import make_training_setup, run_steps
from fedslm.config import ConfigError, ExperimentConfig, TrainingConfig
from fedslm.runtime import experiment_model
from fedslm.tasks.causal_lm import document_blocks, pack_texts

SEQ = 12


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_one_row_per_document_truncated_and_padded(tiny_base, sentences):
    tok = tiny_base[1]
    long = " ".join(sentences[:6])
    short = sentences[7]
    assert len(_ids(tok, long)) > 3 * SEQ and len(_ids(tok, short)) < SEQ - 1
    rows = document_blocks([long, "", short], tok, seq_len=SEQ)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    assert rows.tolist() == [
        _ids(tok, long)[: SEQ - 1] + [tok.eos_token_id],
        _ids(tok, short) + [tok.eos_token_id] + [pad] * (SEQ - 1 - len(_ids(tok, short)))]
    assert len(pack_texts([long], tok, seq_len=SEQ)) >= 3  # packed, the same document spans 3+ blocks
    with pytest.raises(ValueError, match="too little text"):
        document_blocks(["", ""], tok, seq_len=SEQ)


def _step_sum_norm(model, rows: torch.Tensor, clip: float) -> float:
    """Norm of the clipped per-example gradient sum of one noiseless DP-SGD step over all
    ``rows`` (Poisson rate 1: every row is in the batch)."""
    cfg = TrainingConfig(learning_rate=1e-9, local_steps=1, batch_size=len(rows), warmup_ratio=0.0)
    setup = make_training_setup(model, (rows,), cfg, generator_seed=0)
    private = make_private(setup, noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode="hooks",
                           accountant="prv")
    inner = private.setup.optimizer.original_optimizer
    params = [p for g in inner.param_groups for p in g["params"]]
    seen: list[float] = []
    inner.register_step_pre_hook(lambda *a: seen.append(
        float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))))
    try:
        run_steps(private.setup)
    finally:
        private.hooks.cleanup()
    assert len(seen) == 1
    return seen[0] * len(rows)  # Opacus divides the sum by the expected batch size, len(rows)


def test_a_document_contributes_at_most_c_to_a_step(make_peft, tiny_base, sentences):
    tok, clip = tiny_base[1], 1e-3  # far below every gradient's norm: every row is clipped
    document = " ".join(sentences[:6])
    per_document = _step_sum_norm(make_peft(), document_blocks([document], tok, seq_len=SEQ), clip)
    packed = _step_sum_norm(make_peft(), pack_texts([document], tok, seq_len=SEQ), clip)
    assert per_document == pytest.approx(clip, rel=1e-3)  # one row: clipped to exactly C
    assert packed > 1.5 * clip  # the same document over k blocks: up to k*C


def test_the_train_split_has_one_row_per_document(tmp_path: Path):
    cfg = ExperimentConfig.from_dict({
        "federation": {"num_clients": 2}, "data": {"docs_per_client": 12},
        "privacy": {"mode": "dp_sgd", "unit": "document"}, "output_dir": str(tmp_path)})
    from fedslm.client.records import client_texts

    _, tok = experiment_model(cfg)
    texts = [t for t in client_texts(cfg, 0, "train") if t]
    (train,) = client_tensors(cfg, 0, "train", tok)
    assert train.shape == (len(texts), cfg.training.seq_len)
    block = ExperimentConfig.from_dict({**cfg.to_dict(), "privacy": {"mode": "dp_sgd"}})
    assert client_tensors(cfg, 0, "test", tok)[0].tolist() == client_tensors(block, 0, "test", tok)[0].tolist()


@pytest.mark.parametrize(("data", "message"), [
    ({"privacy": {"mode": "dp_fedavg", "unit": "document"}},
     "privacy.unit: document is DP-SGD's record; privacy.mode=dp_fedavg has none"),
    ({"privacy": {"mode": "dp_sgd", "unit": "document"}, "task": {"name": "classify"}},
     "privacy.unit: document applies to task.name=causal_lm"),
    ({"privacy": {"mode": "dp_sgd", "unit": "sentence"}}, "privacy.unit: unknown value 'sentence'"),
])
def test_unit_refusals_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict(data)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_privacy_report_names_the_unit():
    from fedslm.server.audit import privacy_unit

    def unit(**privacy):
        return privacy_unit(ExperimentConfig.from_dict({"privacy": privacy}))

    assert unit(mode="dp_sgd") == "record = one packed block of training.seq_len tokens of a client's train texts"
    assert unit(mode="dp_sgd", unit="document") == "record = one train document (truncated to training.seq_len tokens)"
    assert unit(mode="dp_sgd+dp_fedavg", unit="document").startswith("both: record (a document;")
