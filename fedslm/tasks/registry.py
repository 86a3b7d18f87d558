"""The one registry of tasks: a task module calls ``register_task`` on import."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedslm.tasks.base import Task

_TASKS: dict[str, Task] = {}
BUILTIN = ("causal_lm", "instruct", "classify")  # modules of fedslm.tasks, imported on demand


def register_task(task: Task) -> Task:
    if task.name in _TASKS and type(_TASKS[task.name]) is not type(task):
        raise ValueError(f"task {task.name!r} is registered twice")
    _TASKS[task.name] = task
    return task


def known_task_names() -> tuple[str, ...]:
    """Builtin and registered names, without importing anything."""
    return tuple(sorted(set(BUILTIN) | set(_TASKS)))


def task_names() -> tuple[str, ...]:
    for name in BUILTIN:
        get_task(name)
    return tuple(sorted(_TASKS))


def get_task(name: str) -> Task:
    """The registered task ``name`` (builtin task modules load on first use)."""
    if name not in _TASKS and name in BUILTIN:
        importlib.import_module(f"fedslm.tasks.{name}")
    if name not in _TASKS:
        from fedslm.config import ConfigError

        raise ConfigError(f"task.name: unknown value {name!r}; expected one of {', '.join(BUILTIN)}")
    return _TASKS[name]
