"""Personal adapters on disk, in each client's own dir (``fedslm.client.node``): ``<client dir>/personal/``.

In the shared package because both sides read it: the client keeps its state here, and
in simulation the server's privacy audit (``fedslm.audit.personal``) attacks the
personal adapters the simulated clients left in their dirs.

On disk, not in memory: in simulation one process serves many clients round after
round, and memory must not grow with the population; a client sampled again resumes
from its dir. A device agent passes its own state dir. Each dir is a PEFT-format
adapter (``adapter_config.json`` + ``adapter_model.safetensors``, the client's
``personal``-role tensors) plus ``fedslm-personal.json`` (method, last round, number
of updates), all replaced atomically by ``fedslm.adapters.save_adapter``: a crash
mid-write leaves the previous state intact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from fedslm.adapters import ADAPTER_WEIGHTS_FILE, save_adapter
from fedslm.config import PeftConfig

STATE_FILE = "fedslm-personal.json"


class PersonalStateError(ValueError):
    """A client's state dir cannot be used; the message names the dir."""


@dataclass(frozen=True)
class PersonalState:
    arrays: dict[str, np.ndarray]  # checkpoint name -> tensor (the personal role)
    method: str  # personalization method that wrote it
    round: int  # server round of the last update
    updates: int  # how many rounds updated it
    task: str = ""  # the task it was trained for ("" in dirs written before this was kept)
    labels: tuple[str, ...] = ()  # classify: class names in head order (generate prints them)


def personal_dir(client_dir: Path) -> Path:
    return Path(client_dir) / "personal"


def load_personal(client_dir: Path, *, method: str) -> PersonalState | None:
    """The client's last personal state, or None if it has none yet.

    A dir written by another personalization method is an error, not silently reused
    or overwritten.
    """
    directory = personal_dir(client_dir)
    if not directory.exists():
        return None
    meta_file = directory / STATE_FILE
    if not meta_file.is_file() or not (directory / ADAPTER_WEIGHTS_FILE).is_file():
        raise PersonalStateError(f"personalization.state_dir: {directory} is not a personal state dir "
                                 f"(no {STATE_FILE} or {ADAPTER_WEIGHTS_FILE})")
    meta = json.loads(meta_file.read_text())
    if meta.get("method") != method:
        raise PersonalStateError(
            f"personalization.state_dir: {directory} holds a {meta.get('method')!r} personal adapter, "
            f"this run uses {method!r}; use another output_dir or personalization.state_dir")
    arrays = {name: value for name, value in load_file(str(directory / ADAPTER_WEIGHTS_FILE)).items()}
    return PersonalState(arrays=arrays, method=method, round=int(meta["round"]),
                         updates=int(meta["updates"]), task=str(meta.get("task", "")),
                         labels=tuple(str(v) for v in meta.get("labels", ())))


def save_personal(client_dir: Path, arrays: Mapping[str, np.ndarray], *,
                  method: str, server_round: int, updates: int, peft_cfg: PeftConfig,
                  base_model: str, task: str = "causal_lm",
                  labels: tuple[str, ...] = ()) -> Path:
    """Atomically replace the client's personal state with ``arrays``; the task and its
    class names are kept with it, so a device can use the model from this dir alone."""
    meta = {"method": method, "round": int(server_round), "updates": int(updates), "task": task}
    if labels:
        meta["labels"] = list(labels)
    return save_adapter(arrays, peft_cfg, base_model=base_model,
                        out_dir=personal_dir(client_dir),
                        extra_files={STATE_FILE: json.dumps(meta, indent=2)})


LAST_GLOBAL_DIR = "last_global"  # the global adapter a split/dual device last received


def save_last_global(client_dir: Path, arrays: Mapping[str, np.ndarray], *, server_round: int,
                     peft_cfg: PeftConfig, base_model: str) -> Path:
    """Keep the shared tensors the client last received for evaluation, beside its personal
    adapter: a ``split``/``dual`` personal model is global + personal, and a device must be
    able to use it offline (``fedslm-agent generate``) after the run. Received data only;
    like everything in the state dir it is never sent."""
    return save_adapter(arrays, peft_cfg, base_model=base_model,
                        out_dir=Path(client_dir) / LAST_GLOBAL_DIR,
                        extra_files={STATE_FILE: json.dumps({"round": int(server_round)})})


def personal_method(client_dir: Path) -> str:
    """The method that wrote the client's personal adapter ("" if it has none)."""
    meta = personal_dir(client_dir) / STATE_FILE
    return str(json.loads(meta.read_text()).get("method", "")) if meta.is_file() else ""
