"""Small built-in training tasks with data that ships with a package (no downloads)."""

from kronlab.tasks.base import ClassificationTask
from kronlab.tasks.registry import available_tasks, load_task

__all__ = ["ClassificationTask", "available_tasks", "load_task"]
