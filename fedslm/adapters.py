"""The one rule for which parameters train and travel, and adapter <-> arrays.

Everything that decides "is this tensor trained / sent / saved" goes through
``parameter_role``: ``build_peft_model`` sets ``requires_grad`` from it, and
``adapter_arrays`` checks that PEFT's saved state, the role rule and ``requires_grad``
all name the same tensors, so a disagreement fails loudly instead of leaking a base
weight over the wire. Names are PEFT's checkpoint names (``get_peft_model_state_dict``,
as in ``adapter_model.safetensors``): adapter name removed, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file

from fedslm.config import PeftConfig

Role = Literal["frozen", "shared"]

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

# Name parts that mark a LoRA tensor, in parameter names ("...lora_A.default.weight")
# and checkpoint names ("...lora_A.weight") alike.
_LORA_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"})


class AdapterError(ValueError):
    """Adapter tensors do not fit the model or are unusable; the message names the tensor."""


def parameter_role(name: str, *, bias: str = "none") -> Role:
    """Role of a parameter, from its name alone (parameter or checkpoint name).

    ``bias`` is ``PeftConfig.bias``: it cannot be read off a name, and it decides
    whether bias terms train. ``lora_only`` shares the biases of LoRA-targeted layers
    (PEFT keeps them at ``<layer>.base_layer.bias``); ``all`` shares every bias, as PEFT
    does. A later "personal" role is one more rule checked before the "shared" ones.
    """
    parts = name.split(".")
    if _LORA_PARTS.intersection(parts):
        return "shared"
    if parts[-1] == "bias":
        if bias == "all":
            return "shared"
        if bias == "lora_only" and len(parts) >= 2 and parts[-2] == "base_layer":
            return "shared"
    return "frozen"


def lora_config(peft_cfg: PeftConfig, *, base_model: str | None = None) -> LoraConfig:
    """The PEFT LoraConfig for our schema (one place, used to build and to save)."""
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=list(peft_cfg.target_modules),
        bias=peft_cfg.bias,
        base_model_name_or_path=base_model,
    )


def apply_roles(model: PeftModel) -> None:
    """Set ``requires_grad`` on every parameter from ``parameter_role``."""
    bias = model.peft_config[model.active_adapter].bias
    for name, param in model.named_parameters():
        param.requires_grad_(parameter_role(name, bias=bias) == "shared")


def adapter_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The travelling parameters themselves, keyed by checkpoint name.

    Checked: PEFT's saved set == the role rule's set == the ``requires_grad`` set.
    """
    adapter = model.active_adapter
    bias = model.peft_config[adapter].bias
    params = dict(model.named_parameters())
    saved = get_peft_model_state_dict(
        model, state_dict=params, adapter_name=adapter, save_embedding_layers=False
    )
    saved_ids = {id(p) for p in saved.values()}
    for name, param in params.items():
        shared = parameter_role(name, bias=bias) == "shared"
        if shared != (id(param) in saved_ids) or shared != param.requires_grad:
            raise AdapterError(
                f"{name}: role={'shared' if shared else 'frozen'} but "
                f"saved_by_peft={id(param) in saved_ids}, requires_grad={param.requires_grad}"
            )
    return saved


def adapter_arrays(model: PeftModel) -> dict[str, np.ndarray]:
    """The travelling tensors as float32 numpy copies, keyed by checkpoint name."""
    return {
        name: param.detach().to(device="cpu", dtype=torch.float32).numpy().copy()
        for name, param in adapter_parameters(model).items()
    }


def check_arrays(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Strict check of names, shapes and finiteness; raises AdapterError naming the tensor."""
    missing = [n for n in expected if n not in arrays]
    if missing:
        raise AdapterError(f"{missing[0]}: missing ({len(missing)} adapter tensor(s) missing)")
    extra = [n for n in arrays if n not in expected]
    if extra:
        raise AdapterError(f"{extra[0]}: not an adapter tensor of this model ({len(extra)} extra)")
    for name, shape in expected.items():
        value = np.asarray(arrays[name])
        if tuple(value.shape) != tuple(shape):
            raise AdapterError(f"{name}: shape {tuple(value.shape)}, expected {tuple(shape)}")
        if not np.issubdtype(value.dtype, np.floating):
            raise AdapterError(f"{name}: dtype {value.dtype} is not floating point")
        if not np.isfinite(value).all():
            raise AdapterError(f"{name}: contains non-finite values (NaN or Inf)")


def load_adapter_arrays(model: PeftModel, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy ``arrays`` into the adapter in place, after checking all of them first."""
    params = adapter_parameters(model)
    check_arrays(arrays, {n: tuple(p.shape) for n, p in params.items()})
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(torch.from_numpy(np.asarray(arrays[name])))


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack named numpy arrays for a Flower message (order and names kept)."""
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack a Flower ArrayRecord into named numpy arrays."""
    return {name: array.numpy() for name, array in record.items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialized tensors (what goes over the wire, keys excluded)."""
    return sum(len(array.data) for array in record.values())


def save_adapter(
    arrays: Mapping[str, np.ndarray], peft_cfg: PeftConfig, *, base_model: str, out_dir: Path
) -> Path:
    """Write a standard PEFT adapter dir; an existing one is replaced only by a complete one.

    Loadable with ``PeftModel.from_pretrained(base, out_dir)``. Values are checked
    (finite, floating) before anything is written.
    """
    out_dir = Path(out_dir)
    check_arrays(arrays, {n: np.shape(v) for n, v in arrays.items()})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        lora_config(peft_cfg, base_model=base_model).save_pretrained(str(tmp))
        tensors = {
            n: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for n, v in arrays.items()
        }
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        sync_tree(tmp)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def sync_tree(directory: Path) -> None:
    """fsync the files of a freshly written dir, so a rename never publishes empty files."""
    for path in [*Path(directory).rglob("*"), Path(directory)]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` ends up at ``src`` (caller removes it).

    Linux ``renameat2(RENAME_EXCHANGE)`` swaps the two atomically, so ``dst`` is always a
    complete adapter; elsewhere two renames leave a short window without ``dst``.
    """
    if not dst.exists():
        os.rename(src, dst)
        return
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_EXCHANGE) == 0:
            return
        if ctypes.get_errno() not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(ctypes.get_errno(), f"cannot replace {dst}", str(src))
    old = src.with_name(src.name + ".old")
    os.rename(dst, old)
    os.rename(src, dst)
    os.rename(old, src)
