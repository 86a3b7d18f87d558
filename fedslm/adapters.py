"""The one rule for which parameters train and travel, and adapter <-> arrays.

Everything that decides "is this tensor trained / sent / saved" goes through
``parameter_role``: ``build_peft_model`` sets ``requires_grad`` from it, and
``adapter_arrays`` checks that PEFT's saved state, the role rule and ``requires_grad``
all name the same tensors, so a disagreement fails loudly instead of leaking a base
weight over the wire. Names are PEFT's checkpoint names (``get_peft_model_state_dict``,
as in ``adapter_model.safetensors``): adapter name removed, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.

A task with a head (classification) trains and sends it too: PEFT's ``modules_to_save``
copy of the head (parameter names ``...score.modules_to_save.<adapter>.weight``) is
adapter state like LoRA, and the frozen ``original_module`` beside it is base.

With personalization some adapter tensors are ``personal``: they train but never leave
the client. The model remembers which personalization it was built for
(``apply_roles``), so no caller can ask for the travelling set under another rule.
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

Role = Literal["frozen", "shared", "personal", "fixed"]

GLOBAL_ADAPTER = "default"  # PEFT's name for the first adapter: the one that travels
PERSONAL_ADAPTER = "personal"  # the second adapter of ``dual``; it never travels
_PERSONALIZATION_ATTR = "fedslm_personalization"
_FIXED_LORA_A_ATTR = "fedslm_fixed_lora_a"

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

# Name parts that mark a LoRA tensor, in parameter names ("...lora_A.default.weight")
# and checkpoint names ("...lora_A.weight") alike.
_LORA_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"})
HEAD_PART = "modules_to_save"  # PEFT's trainable copy of a task head (parameter names)


class AdapterError(ValueError):
    """Adapter tensors do not fit the model or are unusable; the message names the tensor."""


def parameter_role(name: str, *, bias: str = "none", personalization: str = "none",
                   fixed_lora_a: bool = False) -> Role:
    """Role of a parameter, from its name alone (parameter or checkpoint name).

    ``bias`` is ``PeftConfig.bias``: it cannot be read off a name, and it decides
    whether bias terms train. ``lora_only`` shares the biases of LoRA-targeted layers
    (PEFT keeps them at ``<layer>.base_layer.bias``); ``all`` shares every bias, as PEFT
    does. ``personalization`` is ``PersonalizationConfig.method``; it turns some
    trainable tensors ``personal`` (trained, kept on the client): ``local_only`` all
    of them, ``split`` the LoRA B matrices, ``dual`` the tensors of the adapter named
    ``personal`` (only parameter names carry the adapter name). ``none`` and
    ``finetune`` share the whole adapter (finetune's private copy is a separate value of
    the same tensors, made and kept on the client, see ``fedslm.client.personal``).
    ``fixed_lora_a`` (aggregation hook below) makes LoRA A ``fixed``.
    """
    parts = name.split(".")
    lora = _LORA_PARTS.intersection(parts)
    if fixed_lora_a and _is_fixed_after_init(lora) and PERSONAL_ADAPTER not in parts:
        return "fixed"  # FFA fixes the global adapter's A; dual's personal adapter trains both
    if lora or HEAD_PART in parts:
        trainable: Role = "shared"
    elif parts[-1] == "bias" and (
        bias == "all" or (bias == "lora_only" and len(parts) >= 2 and parts[-2] == "base_layer")
    ):
        trainable = "shared"
    else:
        return "frozen"
    if personalization == "local_only":
        return "personal"
    if personalization == "split" and lora & {"lora_B", "lora_embedding_B"}:
        return "personal"
    if personalization == "dual" and (lora or HEAD_PART in parts) and PERSONAL_ADAPTER in parts:
        return "personal"
    return trainable


# --- aggregation hook (issue 16, fedslm.aggregation): FFA-LoRA keeps LoRA A at its ----
# seeded init. Role ``fixed``: part of the adapter (PEFT saves it), never trained, never
# sent; every side rebuilds the same value with ``reset_to_init(model, "fixed", seed=...)``.
_FIXED_AFTER_INIT = frozenset({"lora_A", "lora_embedding_A"})
_TRAINED: tuple[Role, ...] = ("shared", "personal")


def _is_fixed_after_init(lora_parts: set[str]) -> bool:
    return bool(_FIXED_AFTER_INIT & lora_parts)


def fixed_lora_a_of(model: PeftModel) -> bool:
    return getattr(model, _FIXED_LORA_A_ATTR, False)
# --- end of aggregation hook ------------------------------------------------------------


def target_modules(peft_cfg: PeftConfig, model_type: str | None = None) -> list[str] | str | None:
    """``peft.target_modules`` for PEFT: ``auto`` (or empty) -> PEFT's own per-architecture
    defaults for ``model_type`` (None when unknown: PEFT resolves it from the model),
    ``all-linear`` as PEFT's keyword, else the names."""
    names = list(peft_cfg.target_modules)
    if not names or names == ["auto"]:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        found = defaults.get(model_type or "")
        return list(found) if found else None
    if names == ["all-linear"]:
        return "all-linear"
    return names


def lora_config(peft_cfg: PeftConfig, *, base_model: str | None = None, task_type: str = "CAUSAL_LM",
                model_type: str | None = None) -> LoraConfig:
    """The PEFT LoraConfig for our schema (one place, used to build and to save)."""
    return LoraConfig(
        task_type=task_type,
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=target_modules(peft_cfg, model_type),
        bias=peft_cfg.bias,
        base_model_name_or_path=base_model,
    )


def personalization_of(model: PeftModel) -> str:
    """The personalization the model's roles were set for (``apply_roles``)."""
    return getattr(model, _PERSONALIZATION_ATTR, "none")


def apply_roles(model: PeftModel, personalization: str | None = None, *,
                fixed_lora_a: bool | None = None) -> None:
    """Set ``requires_grad`` on every parameter from ``parameter_role``.

    ``personalization`` (default: what the model was last set for) is remembered on
    the model, so the travelling set is always computed under the same rule.
    """
    if personalization is None:
        personalization = personalization_of(model)
    if fixed_lora_a is None:
        fixed_lora_a = fixed_lora_a_of(model)
    setattr(model, _PERSONALIZATION_ATTR, personalization)
    setattr(model, _FIXED_LORA_A_ATTR, fixed_lora_a)
    bias = model.peft_config[GLOBAL_ADAPTER].bias
    for name, param in model.named_parameters():
        role = parameter_role(name, bias=bias, personalization=personalization,
                              fixed_lora_a=fixed_lora_a)
        param.requires_grad_(role in _TRAINED)


def adapter_parameters(model: PeftModel, role: Role = "shared") -> dict[str, torch.nn.Parameter]:
    """The parameters of one role (default: the travelling ones), keyed by checkpoint name.

    Checked on every call: PEFT's saved set (over all adapters) == the role rule's
    non-frozen set == the ``requires_grad`` set, and no checkpoint name means two
    different tensors of the asked role.
    """
    personalization, fixed = personalization_of(model), fixed_lora_a_of(model)
    bias = model.peft_config[GLOBAL_ADAPTER].bias
    params = dict(model.named_parameters())
    roles = {id(p): parameter_role(n, bias=bias, personalization=personalization, fixed_lora_a=fixed)
             for n, p in params.items()}
    by_adapter = {
        adapter: get_peft_model_state_dict(
            model, state_dict=params, adapter_name=adapter, save_embedding_layers=False
        )
        for adapter in model.peft_config
    }
    saved_ids = {id(p) for saved in by_adapter.values() for p in saved.values()}
    for name, param in params.items():
        in_adapter, trainable = roles[id(param)] != "frozen", roles[id(param)] in _TRAINED
        if in_adapter != (id(param) in saved_ids) or trainable != param.requires_grad:
            raise AdapterError(
                f"{name}: role={roles[id(param)]} but "
                f"saved_by_peft={id(param) in saved_ids}, requires_grad={param.requires_grad}"
            )
    out: dict[str, torch.nn.Parameter] = {}
    for saved in by_adapter.values():
        for ckpt, param in saved.items():
            if roles[id(param)] != role:
                continue
            if ckpt in out and out[ckpt] is not param:
                raise AdapterError(f"{ckpt}: two different {role} tensors share this name")
            out[ckpt] = param
    return out


def adapter_arrays(model: PeftModel, role: Role = "shared") -> dict[str, np.ndarray]:
    """The tensors of one role (default: the travelling ones) as float32 numpy copies."""
    return {
        name: param.detach().to(device="cpu", dtype=torch.float32).numpy().copy()
        for name, param in adapter_parameters(model, role).items()
    }


def reset_to_init(model: PeftModel, role: Role, *, seed: int) -> None:
    """Give the tensors of ``role`` PEFT's own fresh LoRA init (A random, B zero), from ``seed``.

    Every adapter is re-initialised in module order under ``torch.manual_seed(seed)``
    (so with one adapter this is exactly the server's initial adapter for that seed),
    then every tensor not of ``role`` gets its value back. The caller's RNG is untouched.
    """
    if not adapter_parameters(model, role):
        return
    others = [r for r in ("shared", "personal", "fixed") if r != role]
    keep = {(r, name): p.detach().clone() for r in others
            for name, p in adapter_parameters(model, r).items()}
    reset_lora(model, seed=seed)
    with torch.no_grad():
        for r in others:
            for name, param in adapter_parameters(model, r).items():
                param.copy_(keep[(r, name)])


def reset_lora(model: PeftModel, *, seed: int) -> None:
    """PEFT's fresh init of every adapter (LoRA A random, B zero) under ``seed``, and every
    head copy back to the base's head (built deterministically, ``fedslm.model``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_lora_parameters"):
                for adapter_name in module.lora_A.keys():
                    module.reset_lora_parameters(adapter_name, True)
    with torch.no_grad():
        for module in model.modules():
            copies = getattr(module, "modules_to_save", None)
            original = getattr(module, "original_module", None)
            if isinstance(copies, torch.nn.ModuleDict) and original is not None:
                for copy in copies.values():
                    copy.load_state_dict(original.state_dict())


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


def load_adapter_arrays(
    model: PeftModel, arrays: Mapping[str, np.ndarray], role: Role = "shared"
) -> None:
    """Copy ``arrays`` into the tensors of ``role`` in place, after checking all of them first."""
    params = adapter_parameters(model, role)
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
    arrays: Mapping[str, np.ndarray], peft_cfg: PeftConfig, *, base_model: str, out_dir: Path,
    extra_files: Mapping[str, str] | None = None, task_type: str = "CAUSAL_LM",
    model_type: str | None = None,
) -> Path:
    """Write a standard PEFT adapter dir; an existing one is replaced only by a complete one.

    Loadable with ``PeftModel.from_pretrained(base, out_dir)``. Values are checked
    (finite, floating) before anything is written. ``extra_files`` (name -> text) are
    written into the same dir, so they are replaced atomically with the tensors.
    """
    out_dir = Path(out_dir)
    check_arrays(arrays, {n: np.shape(v) for n, v in arrays.items()})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        lora_config(peft_cfg, base_model=base_model, task_type=task_type,
                    model_type=model_type).save_pretrained(str(tmp))
        tensors = {
            n: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for n, v in arrays.items()
        }
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text)
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
