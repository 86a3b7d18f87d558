"""The Task interface: everything that differs between fine-tuning jobs, in one object.

A task owns the model class and PEFT task type, which extra modules train and travel
(a classification head, through ``fedslm.adapters.parameter_role``), how a client's
records become tensors, the loss (batch mean for training, per example for DP-SGD),
the evaluation statistics a client sends (sums and counts, never texts), how the server
pools them into metrics, and which metric is the task's headline. The rest of FedSLM
(training loop, DP-SGD, personalization, aggregation, reporting) calls only this
interface, so a new task is one module that registers itself plus one config file
(docs/tasks.md).

Records travel through the data layer as strings (hashable, cacheable, partitioned by
flwr-datasets like any text): plain text for ``causal_lm``, a JSON object for tasks
with structure (``instruct``: chat messages; ``classify``: text and label).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from fedslm.device import model_device  # noqa: F401 - tasks move batches to the model's device

if TYPE_CHECKING:  # torch and datasets load lazily: the config check imports tasks
    import datasets
    import torch

    from fedslm.config import DataConfig, ExperimentConfig

Record = str
Batch = tuple["torch.Tensor", ...]  # one row of tensors per example, as ``encode`` returns them
Metrics = dict[str, Any]  # int | float | list[int]

IGNORE_INDEX = -100


class Task(ABC):
    """One fine-tuning job; stateless (one instance per process, shared by all clients)."""

    name: ClassVar[str]
    peft_task_type: ClassVar[str]  # LoraConfig.task_type: CAUSAL_LM, SEQ_CLS
    headline: ClassVar[str]  # the metric a sweep optimises and personal gain compares
    higher_is_better: ClassVar[bool]
    # Columns of the terminal's per-round table, beyond loss and seconds
    report_keys: ClassVar[tuple[str, ...]] = ()

    # --- model ----------------------------------------------------------------------
    def auto_model(self) -> Any:
        """The transformers Auto class that loads the base for this task."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def model_kwargs(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments (e.g. ``num_labels``)."""
        return {}

    def check(self, cfg: ExperimentConfig) -> None:  # noqa: B027 - optional hook, no-op by default
        """Refuse option combinations this task cannot run (one line naming both keys)."""

    # --- data -----------------------------------------------------------------------
    @abstractmethod
    def dataset_records(self, dataset: datasets.Dataset, data: DataConfig, *,
                        where: str) -> datasets.Dataset:
        """The loaded dataset with its ``text`` column holding this task's records."""

    @abstractmethod
    def synthetic_records(self, documents: Sequence[tuple[str, int]], data: DataConfig,
                          *, stream: str) -> tuple[Record, ...]:
        """Records from the built-in corpus's (document, topic) pairs."""

    @abstractmethod
    def encode(self, records: Sequence[Record], tokenizer: Any,
               cfg: ExperimentConfig) -> Batch:
        """Tensors with one row per example (training and evaluation alike)."""

    # --- loss -----------------------------------------------------------------------
    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Scalar training loss of a batch."""

    @abstractmethod
    def per_example_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """``[B]`` losses, each depending on its own example only (DP-SGD clips these)."""

    def ghost_inputs(self, model: torch.nn.Module, batch: Batch) -> tuple[Any, Any, Any]:
        """(logits, targets, per-example shape or None) for Opacus ghost clipping's
        criterion: token tasks flatten ``[B, T]`` positions, classification passes ``[B]``."""
        raise NotImplementedError(f"{self.name} does not support ghost clipping")

    # --- evaluation -----------------------------------------------------------------
    @abstractmethod
    def evaluate(self, model: torch.nn.Module, tensors: Batch, *, batch_size: int,
                 max_batches: int = 0) -> Metrics:
        """A client's evaluation statistics: ``num-examples`` plus sums/counts and the
        per-client scalars its row in clients.csv shows."""

    def generation_metrics(self, model: torch.nn.Module, records: Sequence[Record], tokenizer: Any,
                           cfg: ExperimentConfig) -> tuple[Metrics, list[dict[str, str]]]:
        """Metrics from generated outputs (instruction tasks) and the examples behind them."""
        return {}, []

    def pooled(self, rows: Sequence[dict[str, Any]],
               names: Sequence[str] | None = None) -> dict[str, float]:
        """Metrics computed exactly from the summed statistics of ``rows`` (the server
        overrides the generic weighted means with these)."""
        return {}

    def gain(self, global_metrics: Metrics, personal_metrics: Metrics) -> float:
        """How much better the personal model is, in the unit docs/personalization.md gives."""
        g, p = float(global_metrics[self.headline]), float(personal_metrics[self.headline])
        return 100.0 * (p - g) if self.higher_is_better else 100.0 * (1.0 - p / g)


def batches(tensors: Batch, batch_size: int, max_batches: int = 0, *, device: Any = None):
    """Consecutive batches in order (``max_batches`` 0 = all), on ``device`` if given
    (the model's: a client's tensors stay on CPU, one batch at a time moves)."""
    n = len(tensors[0])
    for index, start in enumerate(range(0, n, batch_size)):
        if max_batches and index >= max_batches:
            return
        batch = tuple(t[start : start + batch_size] for t in tensors)
        yield batch if device is None else tuple(t.to(device) for t in batch)


def pad_right(rows: Sequence[Sequence[int]], *, pad: int, length: int) -> torch.Tensor:
    """``[N, length]`` ids, each row cut to ``length`` and right-padded with ``pad``."""
    import torch

    out = torch.full((len(rows), length), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        row = list(row)[:length]
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
