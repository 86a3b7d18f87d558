"""DP-SGD for one client's round: Opacus on the already-built PEFT model.

Order matters (an Opacus issue reports silently wrong LoRA updates otherwise): the PEFT
model is built and its adapter loaded first, then ``make_training_setup`` builds the
optimizer over the trainable (LoRA) parameters, then ``make_private`` takes over the
optimizer and the loader. Opacus attaches hooks to the model in place
(``wrap_model=False``), so the process-wide cached model stays a ``PeftModel``; the
hooks are removed after the round, whatever happens.

The loss is the task's per-example loss (``fedslm.tasks``: for text, the mean over a
record's own target tokens), averaged over the batch, so one record's gradient depends
on that record alone; Hugging Face's built-in loss averages over all tokens of the
batch, which couples records.
No Flower imports: ``fedslm.client.task`` calls ``train_dp_sgd``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from opacus import PrivacyEngine

from fedslm.client.privacy import (
    BudgetExhausted,
    PrivacyLedger,
    client_delta,
    epsilon_of,
    load_ledger,
    save_ledger,
)
from fedslm.training import IGNORE_INDEX, TrainingSetup, TrainResult, make_training_setup, run_steps
from fedslm.config import PrivacyConfig, TrainingConfig
from fedslm.tasks import get_task
from fedslm.tasks.base import Task
from fedslm.tasks.causal_lm import per_example_token_loss

Metrics = dict[str, int | float]


@dataclass
class RoundBudget:
    """What one round will cost: Opacus's sample rate, the step count, the noise."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float


def plan_round(privacy: PrivacyConfig, training: TrainingConfig, *, num_records: int) -> RoundBudget:
    """The round's (noise, sample rate, steps), known before any data is touched.

    Opacus samples each record with probability 1/len(loader) = 1/ceil(n/B). With
    ``target_epsilon`` the noise is calibrated by Opacus's ``get_noise_multiplier`` (what
    ``make_private_with_epsilon`` calls) for this round's exact step count, because
    ``make_private_with_epsilon`` only accepts whole epochs and a round is usually a
    fixed number of steps.
    """
    sample_rate = 1.0 / -(-num_records // training.batch_size)
    # an epoch of Opacus's Poisson loader is int(1/rate) steps (92, not 93, for 93 batches)
    steps = training.local_steps if training.local_steps > 0 else training.local_epochs * int(1 / sample_rate)
    delta = client_delta(privacy.delta, num_records)
    noise = privacy.noise_multiplier
    if privacy.target_epsilon > 0:
        from opacus.accountants.utils import get_noise_multiplier

        noise = float(get_noise_multiplier(
            target_epsilon=privacy.target_epsilon, target_delta=delta, sample_rate=sample_rate,
            steps=steps, accountant=privacy.accountant_name()))
    return RoundBudget(noise_multiplier=noise, sample_rate=sample_rate, steps=steps, delta=delta)


def per_example_mean_loss(model: torch.nn.Module, batch: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each block's mean next-token loss (pad targets excluded)."""
    return per_example_token_loss(model, batch, labels).mean()


def per_example_objective(task: Task) -> Callable[[torch.nn.Module, tuple], torch.Tensor]:
    """The loss DP-SGD differentiates: the batch mean of the task's per-example losses."""
    def loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        return task.per_example_loss(model, batch).mean()
    return loss


class ClipCounter:
    """Counts per-example gradients whose norm exceeded the clip (a diagnostic for C)."""

    def __init__(self, max_grad_norm: float) -> None:
        self.max_grad_norm = max_grad_norm
        self.clipped = 0
        self.seen = 0

    def observe(self, norms: torch.Tensor | None) -> None:
        if norms is not None and norms.numel():
            self.clipped += int((norms > self.max_grad_norm).sum())
            self.seen += int(norms.numel())

    @property
    def fraction(self) -> float:
        return self.clipped / self.seen if self.seen else 0.0


@dataclass
class PrivateTraining:
    """A ``TrainingSetup`` taken over by Opacus, plus what is needed to account and clean up."""

    setup: TrainingSetup
    engine: PrivacyEngine
    hooks: Any  # Opacus GradSampleHooks(FastGradientClipping); .cleanup() removes them
    clips: ClipCounter


def _entropy_generator() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def make_private(setup: TrainingSetup, *, noise_multiplier: float, max_grad_norm: float,
                 grad_sample_mode: str, accountant: str,
                 noise_generator: torch.Generator | None = None,
                 sample_generator: torch.Generator | None = None,
                 task: Task | None = None) -> PrivateTraining:
    """Hand ``setup``'s optimizer and loader to Opacus; the loop itself is unchanged.

    Noise and Poisson sampling draw from generators seeded with fresh OS entropy unless
    given (tests pass seeded ones). Opacus would otherwise sample with the original
    loader's generator, which ``make_training_setup`` seeds from the run's public
    config: noise or a batch selection anyone can reproduce would protect nothing.
    """
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    noise_generator = noise_generator or _entropy_generator()
    engine = PrivacyEngine(accountant=accountant)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    out = engine.make_private(
        module=setup.model, optimizer=setup.optimizer, data_loader=setup.loader,
        criterion=criterion, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=True, grad_sample_mode=grad_sample_mode, wrap_model=False,
        noise_generator=noise_generator,
    )
    task = task or get_task("causal_lm")
    if grad_sample_mode == "ghost":
        hooks, optimizer, dp_criterion, loader = out
        setup.loss_fn = _ghost_loss(dp_criterion, task)
    else:
        hooks, optimizer, loader = out
        setup.loss_fn = per_example_objective(task)
    if not isinstance(loader.batch_sampler, UniformWithReplacementSampler):
        raise RuntimeError("Opacus did not return a Poisson-sampling loader")
    loader.batch_sampler.generator = sample_generator or _entropy_generator()
    setup.optimizer, setup.loader = optimizer, loader
    setup.max_grad_norm = 0.0  # Opacus clips per example; no second, global clip
    setup.on_empty_batch = _noise_only_step(grad_sample_mode)
    clips = ClipCounter(max_grad_norm)
    optimizer.original_optimizer.register_step_pre_hook(_clip_observer(optimizer, hooks, clips, grad_sample_mode))
    return PrivateTraining(setup=setup, engine=engine, hooks=hooks, clips=clips)


def _ghost_loss(dp_criterion: Callable, task: Task) -> Callable:
    """Ghost clipping's criterion on the task's logits and targets (per example: a
    sequence's tokens share one row of ``shape``)."""
    def loss(model: torch.nn.Module, batch: tuple):
        logits, targets, shape = task.ghost_inputs(model, batch)
        if shape is None:
            return dp_criterion(logits, targets)
        return dp_criterion(logits, targets, shape=shape)
    return loss


def _noise_only_step(grad_sample_mode: str) -> Callable[[TrainingSetup], None]:
    """An empty Poisson batch is still a step: zero clipped sum, plus noise, accounted."""

    def step(setup: TrainingSetup) -> None:
        for p in setup.model.parameters():
            if p.requires_grad:
                if grad_sample_mode == "ghost":
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype, device=p.device)
        setup.optimizer.step()

    return step


def _clip_observer(optimizer, hooks, clips: ClipCounter, grad_sample_mode: str) -> Callable:
    """Runs after Opacus clipped and noised, before the inner optimizer steps."""

    def observe(*_: Any) -> None:
        if grad_sample_mode == "ghost":
            clips.observe(getattr(hooks, "per_sample_gradient_norms", None))
            hooks.per_sample_gradient_norms = None  # an empty batch sets none: count once
            return
        samples = [p.grad_sample for p in optimizer.params]
        if not samples or samples[0] is None or isinstance(samples[0], list) or len(samples[0]) == 0:
            return
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples], dim=1).norm(2, dim=1)
        clips.observe(norms)

    return observe


def train_dp_sgd(model: torch.nn.Module, blocks: torch.Tensor | tuple, training: TrainingConfig,
                 privacy: PrivacyConfig, *, state_dir: Path, server_round: int,
                 generator_seed: int, task: Task | None = None) -> tuple[TrainResult, Metrics]:
    """One DP-SGD round for the client whose ledger lives in ``state_dir``.

    Raises BudgetExhausted, before touching the data, when the round would exceed
    ``privacy.max_epsilon``. Otherwise trains, saves the extended ledger, and returns the
    result with the metrics the reply carries (cumulative epsilon included).
    """
    accountant = privacy.accountant_name()
    ledger = load_ledger(state_dir)
    tensors = (blocks,) if isinstance(blocks, torch.Tensor) else tuple(blocks)
    budget = plan_round(privacy, training, num_records=len(tensors[0]))
    entry = (budget.noise_multiplier, budget.sample_rate, budget.steps)
    if privacy.max_epsilon > 0:
        projected = epsilon_of(ledger.with_round(entry), accountant=accountant, delta=budget.delta)
        if projected > privacy.max_epsilon:
            spent = epsilon_of(ledger.history, accountant=accountant, delta=budget.delta)
            raise BudgetExhausted(
                f"budget exhausted: epsilon {spent:.4g} now, {projected:.4g} after this round "
                f"> privacy.max_epsilon={privacy.max_epsilon:g}",
                {"dp-budget-exhausted": 1, "dp-epsilon": spent, "dp-epsilon-next": projected,
                 "dp-delta": budget.delta, "dp-rounds": len(ledger.rounds),
                 "dp-steps-total": _steps(ledger.history)})
    setup = make_training_setup(model, tensors, training, generator_seed=generator_seed)
    private = make_private(setup, noise_multiplier=budget.noise_multiplier,
                           max_grad_norm=privacy.max_grad_norm,
                           grad_sample_mode=privacy.grad_sample_mode, accountant=accountant,
                           task=task)
    private.engine.accountant.history = list(ledger.history)
    try:
        result = run_steps(private.setup)
    finally:
        private.hooks.cleanup()
    new_history = private.engine.accountant.history
    accounted = _steps(new_history) - _steps(ledger.history)
    if accounted != budget.steps:  # the update does not leave with a ledger that undercounts
        raise RuntimeError(f"DP-SGD accounted {accounted} steps, planned {budget.steps}")
    updated = PrivacyLedger(history=list(new_history), rounds=[*ledger.rounds, server_round])
    save_ledger(updated, state_dir, accountant=accountant, delta=budget.delta)
    epsilon = epsilon_of(updated.history, accountant=accountant, delta=budget.delta)
    return result, {
        "dp-epsilon": epsilon, "dp-delta": budget.delta,
        "dp-noise-multiplier": budget.noise_multiplier, "dp-sample-rate": budget.sample_rate,
        "dp-steps": budget.steps, "dp-steps-total": _steps(updated.history),
        "dp-rounds": len(updated.rounds),
        "dp-clipped-fraction": private.clips.fraction,
    }


def _steps(history: list) -> int:
    return sum(int(steps) for _, _, steps in history)

