"""The named classification tasks `kronlab compare` can train on."""

from __future__ import annotations

from collections.abc import Callable

from kronlab.tasks.base import ClassificationTask
from kronlab.tasks.digits import digits_task


def _digits() -> ClassificationTask:
    return digits_task()


def _digits_cnn() -> ClassificationTask:
    return digits_task(model="cnn")


_TASKS: dict[str, Callable[[], ClassificationTask]] = {"digits": _digits, "digits-cnn": _digits_cnn}


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def load_task(name: str) -> ClassificationTask:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    return _TASKS[name]()
