"""Sample-level DP: Opacus DP-SGD on the tiny PEFT model, the client ledger, the budget.

Real Opacus, real accountants; the references are Opacus's accountants called directly
on the same (noise, sample rate, steps), and Google's dp-accounting as an independent
implementation for the pinned setting.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedslm.client.dp_sgd import make_private, plan_round, train_dp_sgd
from fedslm.client.privacy import BudgetExhausted, LedgerError, epsilon_of, ledger_path, load_ledger
from fedslm.training import make_training_setup, pack_texts, run_steps
from fedslm.adapters import adapter_arrays
from fedslm.config import PrivacyConfig, TrainingConfig


def _blocks(tok, sentences, n, seq_len=16):
    return pack_texts(sentences, tok, seq_len=seq_len)[:n]


def _training(**kw) -> TrainingConfig:
    return TrainingConfig(**{"learning_rate": 0.01, "local_steps": 3, "batch_size": 4,
                             "warmup_ratio": 0.0, **kw})


def _reference_epsilon(accountant: str, history, delta: float) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


# --- accounting -------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_after_rounds_equals_the_reference_accountant(make_peft, tiny_base, sentences,
                                                              tmp_path, accountant):
    blocks = _blocks(tiny_base[1], sentences, 20)
    training = _training(local_steps=3, batch_size=4)  # q = 1/ceil(20/4) = 0.2
    privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.3, max_grad_norm=1.0,
                            accountant=accountant, delta=1e-4)
    model = make_peft()
    reported = []
    for rnd in (1, 2):
        _, metrics = train_dp_sgd(model, blocks, training, privacy, state_dir=tmp_path,
                                  server_round=rnd, generator_seed=rnd)
        reported.append(metrics["dp-epsilon"])
    assert metrics["dp-steps"] == 3 and metrics["dp-rounds"] == 2
    assert metrics["dp-sample-rate"] == 0.2 and metrics["dp-delta"] == 1e-4
    expected = _reference_epsilon(accountant, [(1.3, 0.2, 6)], 1e-4)
    assert reported[1] == pytest.approx(expected, abs=1e-6)
    assert reported[0] == pytest.approx(_reference_epsilon(accountant, [(1.3, 0.2, 3)], 1e-4), abs=1e-6)
    assert reported[0] < reported[1]
    saved = json.loads(ledger_path(tmp_path).read_text())
    assert saved["history"] == [[1.3, 0.2, 6]] and saved["rounds"] == [1, 2]


def test_pinned_epsilon_and_an_independent_accountant_agree():
    history = [(2.0, 0.01, 1000)]
    # Literal values for a fixed setting: a change in Opacus or in our use of it shows here.
    assert epsilon_of(history, accountant="prv", delta=1e-5) == pytest.approx(0.6320840536415899, abs=1e-6)
    assert epsilon_of(history, accountant="rdp", delta=1e-5) == pytest.approx(0.6861853363943466, abs=1e-6)
    # Google's dp-accounting, an independent implementation of the same analyses.
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant
    from opacus.accountants import RDPAccountant

    event = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(2.0))
    rdp = rdp_privacy_accountant.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.compose(event, 1000)
    assert rdp.get_epsilon(1e-5) == pytest.approx(0.6861853363943466, abs=1e-6)
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(event, 1000)
    assert pld.get_epsilon(1e-5) == pytest.approx(0.6320840536415899, rel=0.02)  # PRV vs PLD numerics


def test_epsilon_edge_cases():
    assert epsilon_of([], accountant="prv", delta=1e-5) == 0.0
    assert epsilon_of([(0.0, 0.1, 5)], accountant="prv", delta=1e-5) == math.inf
    # split rounds fold into one entry: same steps, same epsilon
    split = epsilon_of([(1.0, 0.1, 5), (1.0, 0.1, 5)], accountant="prv", delta=1e-5)
    assert split == epsilon_of([(1.0, 0.1, 10)], accountant="prv", delta=1e-5)


def test_ledger_survives_restart_and_never_decreases(make_peft, tiny_base, sentences, tmp_path):
    blocks = _blocks(tiny_base[1], sentences, 16)
    training = _training(local_steps=2, batch_size=4)
    privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0, delta=1e-4)
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    model = make_peft()
    uninterrupted = [train_dp_sgd(model, blocks, training, privacy, state_dir=straight,
                                  server_round=r, generator_seed=r)[1]["dp-epsilon"] for r in (1, 2, 3)]
    assert uninterrupted == sorted(uninterrupted) and uninterrupted[0] < uninterrupted[2]
    for r in (1, 2):
        train_dp_sgd(make_peft(), blocks, training, privacy, state_dir=restarted, server_round=r,
                     generator_seed=r)
    # "restart": a new model object, nothing in memory but what is on disk
    _, metrics = train_dp_sgd(make_peft(seed=5), blocks, training, privacy, state_dir=restarted,
                              server_round=3, generator_seed=3)
    assert metrics["dp-epsilon"] == pytest.approx(uninterrupted[2], abs=1e-9)
    assert load_ledger(restarted) == load_ledger(straight)
    assert load_ledger(restarted).rounds == [1, 2, 3]


def test_unreadable_ledger_is_an_error_not_a_reset(make_peft, tiny_base, sentences, tmp_path):
    ledger_path(tmp_path).write_text("{not json")
    with pytest.raises(LedgerError, match="privacy.json: unreadable privacy ledger"):
        train_dp_sgd(make_peft(), _blocks(tiny_base[1], sentences, 8), _training(),
                     PrivacyConfig(mode="dp_sgd"), state_dir=tmp_path, server_round=1, generator_seed=0)
    assert ledger_path(tmp_path).read_text() == "{not json"


# --- budget ----------------------------------------------------------------------------------


def test_client_at_its_budget_refuses_and_keeps_its_ledger(make_peft, tiny_base, sentences, tmp_path):
    blocks = _blocks(tiny_base[1], sentences, 16)
    training = _training(local_steps=2, batch_size=4)
    privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0, delta=1e-4)
    model = make_peft()
    _, first = train_dp_sgd(model, blocks, training, privacy, state_dir=tmp_path, server_round=1,
                            generator_seed=0)
    capped = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0, delta=1e-4,
                           max_epsilon=first["dp-epsilon"] * 1.05)  # one more round would exceed
    before_file, before_weights = ledger_path(tmp_path).read_text(), adapter_arrays(model)
    with pytest.raises(BudgetExhausted, match="budget exhausted") as refused:
        train_dp_sgd(model, blocks, training, capped, state_dir=tmp_path, server_round=2, generator_seed=0)
    assert refused.value.metrics["dp-budget-exhausted"] == 1
    assert refused.value.metrics["dp-epsilon"] == pytest.approx(first["dp-epsilon"])
    assert refused.value.metrics["dp-epsilon-next"] > capped.max_epsilon
    assert ledger_path(tmp_path).read_text() == before_file
    after = adapter_arrays(model)
    assert all(np.array_equal(before_weights[k], after[k]) for k in after)


def test_target_epsilon_calibrates_one_round(make_peft, tiny_base, sentences, tmp_path):
    blocks = _blocks(tiny_base[1], sentences, 20)
    privacy = PrivacyConfig(mode="dp_sgd", target_epsilon=2.0, delta=1e-4)
    budget = plan_round(privacy, _training(local_steps=5, batch_size=4), num_records=20)
    _, metrics = train_dp_sgd(make_peft(), blocks, _training(local_steps=5, batch_size=4), privacy,
                              state_dir=tmp_path, server_round=1, generator_seed=0)
    assert metrics["dp-noise-multiplier"] == budget.noise_multiplier
    assert 2.0 - 0.011 <= metrics["dp-epsilon"] <= 2.0  # Opacus's search tolerance is 0.01


# --- the mechanism itself ----------------------------------------------------------------------


def _grads_at_step(setup) -> list[list[torch.Tensor]]:
    """p.grad as the inner optimizer sees it (after Opacus clipped, summed, noised, scaled)."""
    seen: list[list[torch.Tensor]] = []
    inner = getattr(setup.optimizer, "original_optimizer", setup.optimizer)
    params = [p for g in inner.param_groups for p in g["params"]]
    inner.register_step_pre_hook(lambda *a: seen.append([p.grad.detach().clone() for p in params]))
    return seen


def _private(model, blocks, *, noise, clip, mode="hooks", steps=1, batch_size=None, lr=0.0,
             sample_generator=None, precision="fp32"):
    cfg = _training(local_steps=steps, batch_size=batch_size or len(blocks), learning_rate=lr or 1e-9,
                    precision=precision)
    setup = make_training_setup(model, blocks, cfg, generator_seed=0)
    private = make_private(setup, noise_multiplier=noise, max_grad_norm=clip, grad_sample_mode=mode,
                           accountant="prv", sample_generator=sample_generator)
    return private


@pytest.mark.parametrize(("mode", "precision"), [("hooks", "fp32"), ("ghost", "fp32"),
                                               ("hooks", "bf16"), ("ghost", "bf16")])
def test_per_example_clipping_bounds_an_outlier(make_peft, tiny_base, sentences, mode, precision):
    """Also under bf16 autocast (training.precision=bf16 is allowed with dp_sgd)."""
    tok = tiny_base[1]
    normal = _blocks(tok, sentences, 5)
    torch.manual_seed(0)
    outlier = torch.randint(4, len(tok), (1, normal.shape[1]))  # random tokens: a huge loss
    clip = 0.01

    def summed_clipped_gradient(blocks):  # q = 1: every record in the one batch
        private = _private(make_peft(), blocks, noise=0.0, clip=clip, mode=mode, precision=precision)
        grads = _grads_at_step(private.setup)
        run_steps(private.setup)
        private.hooks.cleanup()
        return [g * len(blocks) for g in grads[0]]  # undo Opacus's mean over the batch

    with_outlier = summed_clipped_gradient(torch.cat([normal, outlier]))
    without = summed_clipped_gradient(normal)
    contribution = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(with_outlier, without)))
    raw_model = make_peft()
    raw_model(input_ids=outlier, labels=outlier).loss.backward()
    raw = math.sqrt(sum(float((p.grad ** 2).sum()) for p in raw_model.parameters() if p.requires_grad))
    assert raw > 20 * clip  # it really is an outlier
    assert contribution <= clip * (1 + 1e-4)
    assert contribution > 0.5 * clip


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_without_noise_or_clipping_dp_reproduces_the_plain_update(make_peft, tiny_base, sentences, mode):
    blocks = _blocks(tiny_base[1], sentences, 8)  # no padding: per-example and token means agree
    cfg = _training(local_steps=1, batch_size=8, learning_rate=0.01)
    plain = make_peft()
    plain_setup = make_training_setup(plain, blocks, cfg, generator_seed=0)
    plain_grads = _grads_at_step(plain_setup)
    run_steps(plain_setup)
    dp = make_peft()
    setup = make_training_setup(dp, blocks, cfg, generator_seed=0)
    private = make_private(setup, noise_multiplier=0.0, max_grad_norm=1e6, grad_sample_mode=mode,
                           accountant="prv")
    dp_grads = _grads_at_step(private.setup)
    run_steps(private.setup)
    private.hooks.cleanup()
    for a, b in zip(plain_grads[0], dp_grads[0]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    after_plain, after_dp = adapter_arrays(plain), adapter_arrays(dp)
    for name in after_plain:
        # AdamW's first step is ~lr*sign(g): a coordinate with g near 0 may differ slightly
        np.testing.assert_allclose(after_dp[name], after_plain[name], rtol=1e-4, atol=5e-5)


def test_noise_spread_is_sigma_c_over_b(make_peft, tiny_base, sentences):
    blocks = _blocks(tiny_base[1], sentences, 28)
    sigma, clip = 4.0, 0.5
    private = _private(make_peft(), blocks, noise=sigma, clip=clip, steps=6, batch_size=4)  # q = 1/7
    grads = _grads_at_step(private.setup)
    run_steps(private.setup)
    private.hooks.cleanup()
    expected_batch = int(28 * (1 / 7))
    values = torch.cat([g.flatten() for step in grads for g in step])
    assert len(grads) == 6 and values.numel() > 20_000
    assert float(values.std()) == pytest.approx(sigma * clip / expected_batch, rel=0.03)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_lora_weights_change_under_dp_and_base_weights_do_not(make_peft, tiny_base, sentences,
                                                              tmp_path, mode):
    model = make_peft()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = adapter_arrays(model)
    privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=0.5, max_grad_norm=1e-4,
                            grad_sample_mode=mode, delta=1e-4)
    _, metrics = train_dp_sgd(model, _blocks(tiny_base[1], sentences, 16), _training(local_steps=3),
                              privacy, state_dir=tmp_path, server_round=1, generator_seed=0)
    after = adapter_arrays(model)
    assert all(not np.array_equal(before[n], after[n]) for n in before)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, base[name]), name
    assert metrics["dp-clipped-fraction"] == 1.0  # every per-example gradient exceeds 1e-4
    # the cached model is left clean for the next client: no Opacus hooks or attributes
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks
                   for m in model.modules())
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "_norm_sample") for p in model.parameters())


def test_empty_poisson_batches_are_noise_only_steps_and_accounted(make_peft, tiny_base, sentences):
    blocks = _blocks(tiny_base[1], sentences, 12)
    private = _private(make_peft(), blocks, noise=1.0, clip=1.0, steps=30, batch_size=1, lr=0.01,
                       sample_generator=torch.Generator().manual_seed(3))  # q = 1/12
    empty = []
    noise_step = private.setup.on_empty_batch
    private.setup.on_empty_batch = lambda s: (empty.append(1), noise_step(s))
    before = adapter_arrays(private.setup.model)
    result = run_steps(private.setup)
    private.hooks.cleanup()
    assert result.steps == 30 and len(empty) >= 3  # (11/12)^12 = 35% of batches are empty
    assert private.engine.accountant.history == [(1.0, 1 / 12, 30)]
    assert any(not np.array_equal(before[k], v) for k, v in adapter_arrays(private.setup.model).items())



@pytest.mark.parametrize(("records", "batch_size"), [(93, 1), (20, 4), (7, 8)])
def test_planned_epoch_steps_match_opacus_loader(records, batch_size):
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    loader = DPDataLoader.from_data_loader(
        DataLoader(TensorDataset(torch.zeros(records, 2)), batch_size=batch_size))
    budget = plan_round(PrivacyConfig(mode="dp_sgd"),
                        _training(local_steps=0, local_epochs=2, batch_size=batch_size), num_records=records)
    assert budget.steps == 2 * len(loader)
    assert budget.sample_rate == loader.sample_rate


def test_poisson_sampling_does_not_follow_the_public_seed(make_peft, tiny_base, sentences):
    """Two setups built from the same (public) seeds must not draw the same batches."""
    blocks = _blocks(tiny_base[1], sentences, 40)
    draws = []
    for _ in range(2):
        private = _private(make_peft(), blocks, noise=1.0, clip=1.0, batch_size=4)
        draws.append([tuple(batch[0].shape) + tuple(batch[0][:, 0].tolist()) for batch in private.setup.loader])
        private.hooks.cleanup()
    assert draws[0] != draws[1]


def test_per_example_loss_is_the_mean_of_each_blocks_own_transformers_loss(tiny_base) -> None:
    """Shifting labels instead of slicing logits changes no number: each block's loss is
    what transformers computes for that block alone (pad targets ignored)."""
    from fedslm.client.dp_sgd import per_example_mean_loss
    from fedslm.training import IGNORE_INDEX

    model, _ = tiny_base
    torch.manual_seed(3)
    batch = torch.randint(4, 200, (3, 12))
    labels = batch.clone()
    labels[1, 7:] = IGNORE_INDEX  # a padded block
    with torch.no_grad():
        ours = per_example_mean_loss(model, batch, labels)
        each = [model(input_ids=batch[i:i + 1], labels=labels[i:i + 1]).loss for i in range(3)]
    torch.testing.assert_close(ours, torch.stack(each).mean(), rtol=1e-6, atol=1e-6)
