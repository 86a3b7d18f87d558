"""Local training of a LoRA-wrapped model for any task; plain functions, no Flower.

Training is split so a privacy engine can step in between construction and the loop::

    setup = make_training_setup(model, blocks, cfg, generator_seed=seed)
    # e.g. Opacus: setup.model, setup.optimizer, setup.loader = engine.make_private(...)
    result = run_steps(setup)

``run_steps`` sets the learning rate on ``setup.optimizer.param_groups`` each step (no
scheduler object to re-attach after wrapping), and clips the global grad norm only when
``setup.max_grad_norm > 0`` (set it to 0 when a DP optimizer already clips per sample).
Batches are tuples of tensors, one row per example, as the task's ``encode`` made them;
``setup.loss_fn`` is the task's batch loss (DP-SGD swaps in a mean of per-example
losses). Empty batches (Poisson sampling) go to ``setup.on_empty_batch``. The FedProx term's
gradient lands in ``p.grad`` directly, which a DP optimizer rebuilding ``p.grad`` from
per-sample gradients would drop: combining FedProx with DP needs explicit handling.

Shared by both sides: clients train with it (DP-SGD wraps ``make_training_setup`` and
``run_steps``), and the server trains FLTrust's reference update on its root data with
the same plain ``train_local`` (``fedslm.server.fltrust``).

Causal-LM packing, label masking and token statistics live with the task
(``fedslm.tasks.causal_lm``); ``pack_texts``, ``labels_for`` and ``evaluate_lm`` are
re-exported here for the loop's callers.
"""

from __future__ import annotations

import math
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedslm.adapters import adapter_parameters
from fedslm.config import TrainingConfig
from fedslm.device import autocast, grad_scaler, model_device
from fedslm.tasks import get_task
from fedslm.tasks.causal_lm import IGNORE_INDEX, labels_for, pack_texts, pad_id, token_statistics

__all__ = [
    "IGNORE_INDEX",
    "EvalResult",
    "TrainResult",
    "TrainingSetup",
    "evaluate_lm",
    "labels_for",
    "make_training_setup",
    "pack_texts",
    "run_steps",
    "train_local",
]

Batch = tuple[torch.Tensor, ...]  # one row per example: what a task's ``encode`` returns
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


def causal_lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The causal-LM task's batch loss (the default when no task is named)."""
    return get_task("causal_lm").loss(model, batch)


_pad_id = pad_id


# --- learning-rate schedule -----------------------------------------------------------


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warm-up length: ``warmup_ratio`` of the steps, rounded half up."""
    return int(math.floor(warmup_ratio * total_steps + 0.5))


def lr_factor(step: int, *, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier for 0-based optimizer ``step``.

    Linear warm-up ``(step+1)/(warmup+1)``, then linear decay ``(T-step)/(T-warmup)``:
    the peak 1.0 is the first step after warm-up, and no step taken has lr 0 (with
    per-round schedules of ~10 steps a wasted step would matter).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


# --- training -------------------------------------------------------------------------


@dataclass
class TrainResult:
    loss: float  # mean language-model loss over the steps (proximal term excluded)
    steps: int
    num_examples: int  # sequences seen (a sequence seen twice counts twice)
    seconds: float


@dataclass
class TrainingSetup:
    """Everything the loop needs; fields may be replaced (e.g. by a DP engine) before ``run_steps``."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    learning_rate: float
    local_steps: int  # > 0: exactly this many steps, cycling the loader
    local_epochs: int  # used when local_steps == 0
    warmup_ratio: float
    max_grad_norm: float  # 0 = no global clipping
    pad_token_id: int | None = None  # label positions holding it are masked
    proximal_mu: float = 0.0
    proximal: list[tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=list)
    # Called instead of forward/backward for an empty batch; None skips the step. A DP
    # engine sets a noise-only step here (the accountant counts the step either way).
    on_empty_batch: Callable[["TrainingSetup"], None] | None = None
    # (model, batch) -> scalar loss: the task's. A DP engine sets a mean of per-example
    # losses here (one record's gradient must not depend on the others).
    loss_fn: LossFn = causal_lm_loss
    # ``training.precision``: forward and loss under autocast; fp16 with a gradient scaler
    precision: str = "fp32"

    def total_steps(self) -> int:
        return self.local_steps if self.local_steps > 0 else self.local_epochs * len(self.loader)


def make_training_setup(
    model: torch.nn.Module,
    blocks: torch.Tensor | Batch,
    cfg: TrainingConfig,
    *,
    proximal_mu: float = 0.0,
    reference: Mapping[str, torch.Tensor] | None = None,
    generator_seed: int,
    loss_fn: LossFn = causal_lm_loss,
) -> TrainingSetup:
    """Optimizer over trainable params only, a shuffled loader, and the FedProx anchor.

    ``reference`` is keyed by adapter checkpoint names (those of ``adapter_arrays``, i.e.
    what the server sent); values may be tensors or numpy arrays. With
    ``proximal_mu > 0`` and no reference, the anchor is the adapter as it is now (the
    weights just received), which is what FedProx means.
    """
    tensors = (blocks,) if isinstance(blocks, torch.Tensor) else tuple(blocks)
    if len(tensors[0]) == 0:
        raise ValueError("make_training_setup: no training examples")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("make_training_setup: the model has no trainable parameters")
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    loader = DataLoader(
        TensorDataset(*tensors),
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(generator_seed),
    )
    proximal: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    if proximal_mu > 0:
        params = adapter_parameters(model)  # type: ignore[arg-type]  # a PEFT model, typed as its base
        if reference is None:
            reference = {n: p.detach() for n, p in params.items()}
        missing = sorted(set(params) ^ set(reference))
        if missing:
            raise ValueError(f"reference: names differ from the adapter's, e.g. {missing[0]!r}")
        proximal = [
            (p, torch.as_tensor(reference[n]).detach().to(p.device, torch.float32).clone()) for n, p in params.items()
        ]
    return TrainingSetup(
        model=model,
        optimizer=optimizer,
        loader=loader,
        learning_rate=cfg.learning_rate,
        local_steps=cfg.local_steps,
        local_epochs=cfg.local_epochs,
        warmup_ratio=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm,
        pad_token_id=_pad_id(model),
        proximal_mu=proximal_mu,
        proximal=proximal,
        loss_fn=loss_fn,
        precision=cfg.precision,
    )


def proximal_term(pairs: Sequence[tuple[torch.nn.Parameter, torch.Tensor]], mu: float) -> torch.Tensor:
    """FedProx ``(mu/2) * ||w - w_ref||^2`` over the adapter parameters."""
    total = sum(((p.float() - ref) ** 2).sum() for p, ref in pairs)
    return typing.cast(torch.Tensor, 0.5 * mu * total)  # a tensor: ``pairs`` is never empty here


def _batches(setup: TrainingSetup) -> Iterator[Batch]:
    """Batches for the configured length: fixed steps cycle the loader (reshuffled per pass)."""
    if setup.local_steps > 0:
        taken = 0
        while taken < setup.local_steps:
            before = taken
            for batch in setup.loader:
                yield tuple(batch)
                taken += 1
                if taken == setup.local_steps:
                    return
            if taken == before:
                raise ValueError("run_steps: the loader yields no batches")
    else:
        for _ in range(setup.local_epochs):
            for batch in setup.loader:
                yield tuple(batch)


def run_steps(setup: TrainingSetup) -> TrainResult:
    """The training loop proper: schedule, forward, FedProx, backward, clip, step.

    Batches move to the model's device here; forward and loss run under
    ``setup.precision``'s autocast (weights, gradients and the optimizer stay as they are:
    float32 LoRA); fp16 scales the loss and unscales before clipping.
    """
    start = time.perf_counter()
    model, optimizer = setup.model, setup.optimizer
    device = model_device(model)
    scaler = grad_scaler(device, setup.precision)
    total = setup.total_steps()
    warmup = warmup_steps_for(total, setup.warmup_ratio)
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.train()
    # of steps that ran the model (a NaN here is divergence); kept on the device and read
    # once at the end, so no step waits for the GPU to finish the one before
    losses: list[torch.Tensor] = []
    examples = steps = 0
    for step, batch in enumerate(_batches(setup)):
        steps += 1
        for group in optimizer.param_groups:
            group["lr"] = setup.learning_rate * lr_factor(step, total_steps=total, warmup_steps=warmup)
        optimizer.zero_grad(set_to_none=True)
        if len(batch[0]) == 0:  # only Poisson sampling (DP) draws these; models cannot run them
            if setup.on_empty_batch is not None:
                setup.on_empty_batch(setup)
            continue
        batch = tuple(t.to(device, non_blocking=True) for t in batch)
        with autocast(device, setup.precision):
            loss = setup.loss_fn(model, batch)
        objective = loss + proximal_term(setup.proximal, setup.proximal_mu) if setup.proximal else loss
        if scaler is not None:
            scaler.scale(objective).backward()
            scaler.unscale_(optimizer)
        else:
            objective.backward()
        if setup.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, setup.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)  # skips a step whose gradients overflowed
            scaler.update()
        else:
            optimizer.step()
        losses.append(loss.detach())
        examples += len(batch[0])
    model.train(was_training)
    values = torch.stack(losses).tolist() if losses else []
    return TrainResult(
        loss=sum(values) / len(values) if values else float("nan"),
        steps=steps,
        num_examples=examples,
        seconds=time.perf_counter() - start,
    )


def train_local(
    model: torch.nn.Module,
    blocks: torch.Tensor | Batch,
    cfg: TrainingConfig,
    *,
    proximal_mu: float = 0.0,
    reference: Mapping[str, torch.Tensor] | None = None,
    generator_seed: int,
    loss_fn: LossFn = causal_lm_loss,
) -> TrainResult:
    """One client's local training round (see ``make_training_setup`` / ``run_steps``).

    The global torch RNG (LoRA dropout) is seeded with ``generator_seed`` too, so a round
    is reproducible. DP training does not come through here: its noise and sampling
    draw from fresh entropy (``fedslm.client.dp_sgd``).
    """
    torch.manual_seed(generator_seed)
    setup = make_training_setup(
        model, blocks, cfg, proximal_mu=proximal_mu, reference=reference, generator_seed=generator_seed, loss_fn=loss_fn
    )
    return run_steps(setup)


# --- evaluation -----------------------------------------------------------------------


@dataclass
class EvalResult:
    loss: float  # mean next-token cross-entropy over non-pad targets (nats)
    perplexity: float  # exp(loss)
    accuracy: float  # next-token top-1 over the same targets
    num_tokens: int  # targets counted
    num_examples: int  # sequences evaluated


def evaluate_lm(
    model: torch.nn.Module, blocks: torch.LongTensor, *, batch_size: int, max_batches: int = 0
) -> EvalResult:
    """Token-weighted loss/accuracy over causal-LM ``blocks`` in order (``max_batches`` 0 = all)."""
    stats = token_statistics(
        model, blocks, labels_for(blocks, pad_id(model)), batch_size=batch_size, max_batches=max_batches
    )
    loss = stats["loss"]
    return EvalResult(
        loss=loss,
        perplexity=math.exp(loss) if loss < 700 else float("inf"),
        accuracy=stats["accuracy"],
        num_tokens=stats["num-tokens"],
        num_examples=stats["num-examples"],
    )
