"""Fine-tuning tasks behind one interface (``fedslm.tasks.base.Task``), found by name."""

from fedslm.tasks.registry import get_task, register_task, task_names

__all__ = ["get_task", "register_task", "task_names"]
