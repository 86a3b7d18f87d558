"""The personal model a client keeps, read from its state dir (``fedslm.client.node``), offline.

A state dir alone is enough: ``personal/`` holds the personal adapter (PEFT format, with
the base model's path and the LoRA config) and the method that wrote it; ``split`` and
``dual`` also need the global tensors, kept in ``last_global/`` when the client last
evaluated (``fedslm.personal_state.save_last_global``) or given by the caller (a run's
final adapter).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedslm.personal_state import (LAST_GLOBAL_DIR, STATE_FILE, PersonalStateError,
                            load_personal, personal_dir, personal_method)
from fedslm.config import PeftConfig
from fedslm.inference import NEEDS_GLOBAL, InferenceError, head_size, read_adapter


@dataclass(frozen=True)
class PersonalParts:
    """Everything ``fedslm.inference.assemble_model`` needs for a client's personal model."""

    base_path: str
    peft_cfg: PeftConfig
    method: str
    shared: Mapping[str, np.ndarray] | None
    personal: Mapping[str, np.ndarray]
    round: int
    client_dir: Path
    task: str = "causal_lm"  # "classify" when the adapters carry a classification head
    labels: tuple[str, ...] = ()  # classify: class names in head order


def client_dir_of(path: Path) -> Path:
    """Accept a client's state dir or its ``personal/`` dir itself."""
    path = Path(path).expanduser()
    return path.parent if (path / STATE_FILE).is_file() else path


def personal_parts(path: Path, *, method: str | None = None,
                   shared: Mapping[str, np.ndarray] | None = None) -> PersonalParts:
    """Read a client's personal model. ``method`` (the run's) must match the one that wrote
    it; ``shared`` (the run's global tensors) wins over the dir's ``last_global/``."""
    client_dir = client_dir_of(path)
    if not client_dir.is_dir():
        raise InferenceError(f"--personal: {client_dir} is not a directory")
    written_by = personal_method(client_dir)
    if not written_by:
        raise InferenceError(f"--personal: {client_dir} has no personal adapter "
                             f"({personal_dir(client_dir)}/{STATE_FILE} missing)")
    try:
        state = load_personal(client_dir, method=method or written_by)
    except PersonalStateError as err:
        raise InferenceError(f"--personal: {str(err).split(': ', 1)[-1]}") from None
    assert state is not None  # the state file exists
    _, peft_cfg, base_path = read_adapter(personal_dir(client_dir))
    if shared is None and state.method in NEEDS_GLOBAL:
        last = client_dir / LAST_GLOBAL_DIR
        if not last.is_dir():
            raise InferenceError(f"--personal: a {state.method!r} personal model is global + "
                                 f"personal and {last} does not exist; pass --run <the run>")
        shared = read_adapter(last)[0]
    classes = head_size(shared, state.arrays)
    task = "classify" if classes else (state.task or "causal_lm")
    labels = tuple(state.labels) if len(state.labels) == classes else tuple(map(str, range(classes)))
    return PersonalParts(base_path=base_path, peft_cfg=peft_cfg, method=state.method,
                         shared=shared, personal=state.arrays, round=state.round,
                         client_dir=client_dir, task=task, labels=labels)
