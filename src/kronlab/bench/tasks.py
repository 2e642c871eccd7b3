"""The convergence benchmark's tasks: model, batches, training loss and validation loss.

``digits-mlp`` and ``digits-cnn`` are the ``kronlab compare`` tasks (``kronlab.tasks``) with
the test split as validation data; ``charlm`` is :mod:`kronlab.bench.charlm`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import nn

DIGITS_BATCH_SIZE = 64


@dataclass(frozen=True)
class ConvergenceTask:
    """What a run needs from a task; ``steps`` is the full budget, ``quick_steps`` ``--quick``'s.

    ``batches(steps, seed)`` yields the training batches (the same for every optimizer at one
    seed), ``loss(model, batch)`` is the training loss and ``validation_loss(model)`` the
    figure the benchmark compares. ``validation_items(model)``, where given, is the validation
    loss of each item (a 1-D tensor whose mean is the validation loss; the runner then uses it
    in place of ``validation_loss``).
    """

    name: str
    description: str
    steps: int
    quick_steps: int
    make_model: Callable[[int], nn.Module]
    batches: Callable[[int, int], Iterator[Any]]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    validation_loss: Callable[[nn.Module], float]
    validation_items: Callable[[nn.Module], torch.Tensor] | None = None


def _digits(model: str) -> ConvergenceTask:
    from kronlab.compare import batch_schedule, evaluate
    from kronlab.tasks import load_task

    task = load_task("digits" if model == "mlp" else "digits-cnn")

    def batches(steps: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for indices in batch_schedule(len(task.train_inputs), steps, DIGITS_BATCH_SIZE, seed):
            yield task.train_inputs[indices], task.train_targets[indices]

    def loss(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return task.loss(module(batch[0]), batch[1])

    return ConvergenceTask(
        name=f"digits-{model}",
        description=f"scikit-learn digits, {model.upper()} (the `kronlab compare` model), "
        f"batch {DIGITS_BATCH_SIZE}, validation = the 20% test split",
        # The shortest budget tried (50, 150, 300, 600) at which AdamW's validation loss still
        # falls by more than 2% over the last fifth of the run (BENCHMARKS.md, "charlm budget").
        steps=600,
        quick_steps=200,
        make_model=task.make_model,
        batches=batches,
        loss=loss,
        validation_loss=lambda module: evaluate(module, task)[0],
    )


def _charlm() -> ConvergenceTask:
    from kronlab.bench import charlm

    return ConvergenceTask(
        name="charlm",
        description="byte-level GPT (d_model 192, 3 layers, 4 heads, context 128, batch 32) on "
        f"{len(charlm.TRAIN_MODULES)} stdlib modules, validation on "
        f"{len(charlm.VALIDATION_MODULES)} others",
        # The shortest budget tried (50, 150, 300, 600) at which AdamW's validation loss still
        # falls by more than 2% over the last fifth of the run (BENCHMARKS.md, "charlm budget").
        steps=600,
        quick_steps=50,
        make_model=charlm.make_model,
        batches=charlm.batches,
        loss=charlm.loss,
        validation_loss=charlm.validation_loss,
        validation_items=charlm.window_losses,
    )


_BUILDERS: dict[str, Callable[[], ConvergenceTask]] = {
    "digits-mlp": lambda: _digits("mlp"),
    "digits-cnn": lambda: _digits("cnn"),
    "charlm": _charlm,
}
TASK_NAMES = tuple(_BUILDERS)


@cache
def load_convergence_task(name: str) -> ConvergenceTask:
    """The task ``name`` (one of :data:`TASK_NAMES`), built once per process."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASK_NAMES)}")
    return _BUILDERS[name]()
