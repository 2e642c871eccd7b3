"""Benchmarks run on demand (never in CI): ``kronlab bench convergence``.

``run_convergence`` trains every selected optimizer on small built-in tasks under one protocol
(learning-rate grid, seeds, shared schedule and weight decay) and reports how soon each reaches
AdamW's final validation loss, in steps and in seconds.
"""

from kronlab.bench.convergence import run_convergence
from kronlab.bench.tasks import TASK_NAMES, ConvergenceTask, load_convergence_task

__all__ = ["TASK_NAMES", "ConvergenceTask", "load_convergence_task", "run_convergence"]
