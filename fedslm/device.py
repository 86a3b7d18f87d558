"""Where a model runs and in which precision: one place that asks the machine.

``resolve_device`` turns ``training.device`` into a torch device (``auto``: cuda when
available, else cpu). ``check_machine`` refuses, with one line naming the key, what this
machine cannot do (cuda without a GPU, 4-/8-bit without CUDA or bitsandbytes, fp16 on
CPU); the simulation's preflight and the device agent call it before anything starts.
The schema check in ``fedslm.config`` stays machine-independent (a server without a GPU
may run clients that have one). torch is imported lazily: the config check imports this.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import TYPE_CHECKING, Any

from fedslm.config import ConfigError, ExperimentConfig

if TYPE_CHECKING:
    import torch


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def resolve_device(name: str) -> "torch.device":
    """``training.device`` as a torch device; ConfigError if this machine lacks it."""
    import torch

    if name == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if name == "cuda" and not cuda_available():
        raise ConfigError("training.device: cuda was requested but torch sees no CUDA GPU on "
                          "this machine (use training.device=auto or cpu)")
    if name == "mps" and not mps_available():
        raise ConfigError("training.device: mps was requested but this machine has no Apple "
                          "MPS backend (use training.device=auto or cpu)")
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"training.device: unknown value {name!r}; expected one of auto, cpu, cuda, mps")
    return torch.device(name)


def check_machine(cfg: ExperimentConfig) -> "torch.device":
    """The device this machine will train on, or ConfigError for what it cannot do."""
    device = resolve_device(cfg.training.device)
    if cfg.training.precision == "fp16" and device.type == "cpu":
        raise ConfigError("training.precision: fp16 needs a GPU (CPU autocast computes in "
                          "bfloat16 only); use bf16 or fp32 on this machine")
    quant = cfg.model.quantization
    if quant != "none":
        if device.type != "cuda":
            raise ConfigError(f"model.quantization: {quant} needs a CUDA GPU (bitsandbytes); "
                              f"this run's device is {device.type}")
        if not bitsandbytes_available():
            raise ConfigError(f"model.quantization: {quant} needs the bitsandbytes package "
                              "(pip install bitsandbytes)")
    return device


def machine_can_refuse(cfg: ExperimentConfig) -> bool:
    """Whether ``check_machine`` could refuse ``cfg`` on some machine: not for
    ``training.device`` auto or cpu in fp32/bf16 without quantization, which every machine
    runs. The simulation's launcher asks this first: importing torch to learn what it
    cannot change is ~1 CPU-second of every launch."""
    return (cfg.training.device not in ("auto", "cpu") or cfg.training.precision == "fp16"
            or cfg.model.quantization != "none")


def refuse_unsupported(cfg: ExperimentConfig) -> None:
    """``check_machine``'s refusals, importing torch only where one is possible."""
    if machine_can_refuse(cfg):
        check_machine(cfg)


AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def autocast(device: "torch.device", precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``training.precision`` (fp32: no-op)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, AUTOCAST_DTYPES[precision]))


def grad_scaler(device: "torch.device", precision: str) -> Any:
    """A gradient scaler for fp16 (its small range underflows gradients), else None."""
    import torch

    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def model_device(model: "torch.nn.Module") -> "torch.device":
    """Where the model's (first) parameters live: inputs go there (cpu for a model
    without parameters, e.g. a hand-built stand-in)."""
    import torch

    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def quantization_kwargs(quantization: str, device: "torch.device") -> dict[str, Any]:
    """``from_pretrained`` arguments for a bitsandbytes-quantized base (QLoRA's NF4 with
    double quantization and bf16 compute for 4-bit; LLM.int8 for 8-bit)."""
    if quantization == "none":
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    index = device.index if device.index is not None else 0
    return {"quantization_config": bnb, "device_map": {"": index}}


def main(argv: list[str] | None = None) -> int:
    """``python -m fedslm.device NAME``: print what NAME resolves to here, or the reason
    it cannot (exit 2); the device agent asks this in a child process."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    try:
        print(resolve_device(args[0] if args else "auto"))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
