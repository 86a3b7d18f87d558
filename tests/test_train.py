"""fedslm.training (the loop clients and the FLTrust server share): packing, the lr
schedule, local training (FedProx included) and evaluation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedslm import training as train_mod
from fedslm.training import (
    IGNORE_INDEX,
    evaluate_lm,
    labels_for,
    lr_factor,
    make_training_setup,
    pack_texts,
    proximal_term,
    run_steps,
    train_local,
    warmup_steps_for,
)
from fedslm.adapters import adapter_arrays
from fedslm.config import TrainingConfig

# --- packing --------------------------------------------------------------------------


def test_pack_texts_is_consecutive_blocks_joined_with_eos(tiny_base, sentences):
    _, tok = tiny_base
    texts = sentences[:50]
    blocks = pack_texts(texts, tok, seq_len=16)
    stream = []
    for text in texts:
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // 16
    assert blocks.dtype == torch.long and blocks.shape == (n, 16)
    assert blocks.flatten().tolist() == stream[: n * 16]
    assert tok.pad_token_id not in blocks.tolist()


def test_pack_texts_short_text_is_one_padded_block(tiny_base):
    _, tok = tiny_base
    ids = tok("the farmer", add_special_tokens=False)["input_ids"]
    blocks = pack_texts(["the farmer", ""], tok, seq_len=32)
    expected = ids + [tok.eos_token_id] + [tok.pad_token_id] * (32 - len(ids) - 1)
    assert blocks.tolist() == [expected]
    labels = labels_for(blocks, tok.pad_token_id)
    assert (labels[0, len(ids) + 1 :] == IGNORE_INDEX).all()
    assert labels[0, : len(ids) + 1].tolist() == ids + [tok.eos_token_id]


def test_pack_texts_rejects_no_text(tiny_base):
    _, tok = tiny_base
    with pytest.raises(ValueError, match="too little text"):
        pack_texts(["", ""], tok, seq_len=8)
    with pytest.raises(ValueError, match="too little text"):
        pack_texts([], tok, seq_len=8)


# --- schedule -------------------------------------------------------------------------


def test_lr_schedule_exact_values():
    assert warmup_steps_for(10, 0.1) == 1
    assert warmup_steps_for(30, 0.1) == 3  # 0.1 * 30 is 3.0000000000000004
    assert warmup_steps_for(5, 0.1) == 1  # 0.5 rounds up
    assert warmup_steps_for(10, 0.0) == 0

    factors = [lr_factor(s, total_steps=10, warmup_steps=1) for s in range(10)]
    assert factors[0] == 0.5
    assert factors[1] == 1.0
    assert factors[2] == pytest.approx(8 / 9)
    assert factors[9] == pytest.approx(1 / 9)

    warm = [lr_factor(s, total_steps=20, warmup_steps=5) for s in range(20)]
    assert warm[:6] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert warm[19] == pytest.approx(1 / 15)
    assert all(a < b for a, b in zip(warm[:5], warm[1:6]))  # rises
    assert all(a > b for a, b in zip(warm[5:], warm[6:]))  # then falls
    assert min(warm) > 0  # no step is wasted at lr 0

    assert lr_factor(0, total_steps=4, warmup_steps=0) == 1.0
    assert lr_factor(3, total_steps=4, warmup_steps=0) == 0.25


def test_run_steps_applies_the_schedule(make_peft, tiny_base, sentences):
    model = make_peft()
    blocks = pack_texts(sentences[:40], tiny_base[1], seq_len=16)
    cfg = TrainingConfig(learning_rate=0.01, local_steps=7, warmup_ratio=0.3, batch_size=4)
    setup = make_training_setup(model, blocks, cfg, generator_seed=0)
    seen: list[float] = []
    step = setup.optimizer.step

    def spy(*args, **kwargs):
        seen.append(setup.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    setup.optimizer.step = spy
    run_steps(setup)
    expected = [0.01 * lr_factor(s, total_steps=7, warmup_steps=2) for s in range(7)]
    assert seen == pytest.approx(expected)


# --- training -------------------------------------------------------------------------


def _repetitive_blocks(tok, seq_len=32):
    return pack_texts(["the farmer repairs the bridge near the harbour."] * 150, tok, seq_len=seq_len)


def test_the_reported_loss_is_the_mean_of_the_steps_losses(make_peft, tiny_base):
    """The loop reads its losses once, at the end (a read per step would make every step wait
    for the GPU); what it reports is still exactly the mean of the steps' losses."""
    model = make_peft(r=4)
    blocks = _repetitive_blocks(tiny_base[1])[:24]
    seen: list[float] = []

    def recorded_loss(m, batch):
        loss = train_mod.causal_lm_loss(m, batch)
        seen.append(float(loss.detach()))
        return loss

    cfg = TrainingConfig(learning_rate=0.03, local_steps=5, batch_size=4)
    result = run_steps(make_training_setup(model, blocks, cfg, generator_seed=0, loss_fn=recorded_loss))
    assert result.steps == 5 and len(seen) == 5 and len(set(seen)) == 5
    assert result.loss == sum(seen) / 5


def test_train_local_learns_lora_only(make_peft, tiny_base, monkeypatch):
    model = make_peft(r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    blocks = _repetitive_blocks(tiny_base[1])[:40]  # 10 batches of 4 per pass
    base_weights = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    lora_before = adapter_arrays(model)
    before = evaluate_lm(model, blocks, batch_size=8)

    def forbidden(*args):
        raise AssertionError("torch.set_num_threads is the caller's decision")

    monkeypatch.setattr(torch, "set_num_threads", forbidden)
    cfg = TrainingConfig(learning_rate=0.03, local_steps=30, batch_size=4, warmup_ratio=0.1)
    result = train_local(model, blocks, cfg, generator_seed=0)
    after = evaluate_lm(model, blocks, batch_size=8)

    assert result.steps == 30 and result.num_examples == 30 * 4 and result.seconds > 0
    assert math.isfinite(result.loss)
    # Random base (near-uniform logits): LoRA alone still makes clear progress.
    assert after.loss < before.loss - 0.3
    assert after.accuracy > before.accuracy + 0.3
    lora_after = adapter_arrays(model)
    assert all(not np.array_equal(lora_before[n], lora_after[n]) for n in lora_before)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, base_weights[name]), name


def test_train_local_epochs_mode_and_determinism(make_peft, tiny_base):
    blocks = _repetitive_blocks(tiny_base[1])[:10]
    cfg = TrainingConfig(local_steps=0, local_epochs=2, batch_size=4)
    a, b = make_peft(seed=0), make_peft(seed=0)
    result = train_local(a, blocks, cfg, generator_seed=3)
    assert (result.steps, result.num_examples) == (2 * 3, 2 * 10)  # ceil(10/4) batches per epoch
    train_local(b, blocks, cfg, generator_seed=3)
    arrays_a, arrays_b = adapter_arrays(a), adapter_arrays(b)
    assert all(np.array_equal(arrays_a[n], arrays_b[n]) for n in arrays_a)


def test_proximal_term_value():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ref = torch.tensor([0.0, 4.0])
    assert float(proximal_term([(p, ref)], mu=0.5)) == pytest.approx(0.25 * (1 + 4))


def _distance(arrays, reference):
    return math.sqrt(sum(float(((arrays[n] - reference[n]) ** 2).sum()) for n in reference))


def test_fedprox_pulls_toward_reference(make_peft, tiny_base):
    blocks = _repetitive_blocks(tiny_base[1])
    cfg = TrainingConfig(learning_rate=0.01, local_steps=20, batch_size=4)
    free, held = make_peft(seed=0), make_peft(seed=0)
    reference = adapter_arrays(free)  # the "global" adapter both start from
    train_local(free, blocks, cfg, generator_seed=0)
    train_local(
        held,
        blocks,
        cfg,
        proximal_mu=1e4,
        reference={n: torch.from_numpy(v) for n, v in reference.items()},
        generator_seed=0,
    )
    d_free, d_held = _distance(adapter_arrays(free), reference), _distance(adapter_arrays(held), reference)
    assert d_held < 0.1 * d_free


def test_fedprox_default_reference_is_the_start(make_peft, tiny_base):
    model = make_peft()
    start = adapter_arrays(model)
    setup = make_training_setup(
        model, _repetitive_blocks(tiny_base[1]), TrainingConfig(), proximal_mu=1.0, generator_seed=0
    )
    assert float(proximal_term(setup.proximal, 1.0)) == 0.0
    assert len(setup.proximal) == len(start)
    with pytest.raises(ValueError, match="reference"):
        make_training_setup(
            model, _repetitive_blocks(tiny_base[1]), TrainingConfig(), proximal_mu=1.0,
            reference={"nope": torch.zeros(1)}, generator_seed=0,
        )


def test_setup_exposes_pieces_a_dp_engine_replaces(make_peft, tiny_base):
    model = make_peft()
    setup = make_training_setup(model, _repetitive_blocks(tiny_base[1]), TrainingConfig(), generator_seed=0)
    assert isinstance(setup.loader.dataset, torch.utils.data.TensorDataset)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    optimized = {id(p) for group in setup.optimizer.param_groups for p in group["params"]}
    assert optimized == trainable


# --- evaluation -----------------------------------------------------------------------


class _FixedLM(torch.nn.Module):
    """Logits we control: ``scale`` on the token after ``x`` (mod vocab), 0 elsewhere."""

    def __init__(self, vocab: int, scale: float, pad_token_id: int | None = None):
        super().__init__()
        self.vocab, self.scale = vocab, scale
        self.config = SimpleNamespace(pad_token_id=pad_token_id)

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits.scatter_(-1, ((input_ids + 1) % self.vocab).unsqueeze(-1), self.scale)
        return SimpleNamespace(logits=logits)


def test_evaluate_exact_on_controlled_logits():
    vocab, scale = 10, 3.0
    blocks = torch.tensor([[1, 2, 3, 4, 5], [5, 6, 9, 0, 0], [7, 8, 9, 0, 1]])  # 0 = pad
    result = evaluate_lm(_FixedLM(vocab, scale, pad_token_id=0), blocks, batch_size=2)
    # Non-pad targets: row0 2,3,4,5 (all right); row1 6 (right), 9 (wrong); row2 8,9 (right), 1 (right).
    # Row 1's last two targets and row 2's target 0 are pad: masked.
    right = -math.log(math.exp(scale) / (math.exp(scale) + vocab - 1))
    wrong = -math.log(1 / (math.exp(scale) + vocab - 1))
    assert result.num_tokens == 9 and result.num_examples == 3
    assert result.accuracy == pytest.approx(8 / 9)
    assert result.loss == pytest.approx((8 * right + wrong) / 9, rel=1e-6)
    assert result.perplexity == math.exp(result.loss)


def test_evaluate_uniform_logits_is_log_vocab():
    blocks = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    result = evaluate_lm(_FixedLM(vocab=10, scale=0.0), blocks, batch_size=4)
    assert result.loss == pytest.approx(math.log(10), rel=1e-6)
    assert result.accuracy == 0.0  # argmax of a tie is token 0, never a target here


def test_evaluate_matches_model_loss(make_peft, tiny_base, sentences, monkeypatch):
    model = make_peft()
    _, tok = tiny_base
    blocks = torch.cat([pack_texts(sentences[:30], tok, seq_len=24), pack_texts(["short"], tok, seq_len=24)])
    monkeypatch.setattr(torch, "set_num_threads", lambda *a: pytest.fail("set_num_threads called"))
    result = evaluate_lm(model, blocks, batch_size=5)
    with torch.no_grad():
        model.eval()
        labels = labels_for(blocks, tok.pad_token_id)
        manual = model(input_ids=blocks, labels=labels).loss.item()  # HF: mean over non-pad targets
    assert result.loss == pytest.approx(manual, rel=1e-5)
    assert result.perplexity == math.exp(result.loss)
    assert 0.0 <= result.accuracy <= 1.0
    assert result.num_tokens == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert result.num_examples == len(blocks)
    limited = evaluate_lm(model, blocks, batch_size=5, max_batches=2)
    assert limited.num_examples == 10


def test_evaluate_keeps_train_mode_and_rejects_empty(make_peft):
    model = make_peft()
    model.train()
    evaluate_lm(model, torch.tensor([[5, 6, 7]]), batch_size=1)
    assert model.training
    with pytest.raises(ValueError, match="no target tokens"):
        evaluate_lm(_FixedLM(4, 1.0, pad_token_id=0), torch.tensor([[3, 0, 0]]), batch_size=1)


def test_no_flower_imports():
    source = open(train_mod.__file__).read()
    assert "flwr" not in source


def test_empty_batches_go_to_the_hook(make_peft, tiny_base):
    model = make_peft()
    blocks = _repetitive_blocks(tiny_base[1])
    setup = make_training_setup(model, blocks, TrainingConfig(local_steps=3), generator_seed=0)
    empty = torch.empty(0, blocks.shape[1], dtype=torch.long)
    setup.loader = [(empty,), (blocks[:2],)]  # what a Poisson-sampling DP loader may yield
    calls: list[object] = []
    setup.on_empty_batch = calls.append
    result = run_steps(setup)
    assert len(calls) == 2 and calls[0] is setup  # steps 0 and 2 drew the empty batch
    assert (result.steps, result.num_examples) == (3, 2)
    assert math.isfinite(result.loss)
