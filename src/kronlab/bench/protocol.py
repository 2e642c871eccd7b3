"""The protocol: a learning-rate grid at one seed, then more seeds at each optimizer's best lr.

Grid: the optimizer's default lr times ``3^k`` for ``k`` in :data:`GRID_EXPONENTS` (four points,
a factor 3 apart, from a ninth of the default to three times it). The best lr is the one with the
lowest final validation loss at seed 0 (a diverged run never wins); seeds ``1 … seeds-1`` then
run at it, and seed 0's grid run is reused. ``quick`` skips the grid (default lr, seed 0, the
task's short budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kronlab.bench.optimizers import OptimizerSpec, resolve
from kronlab.bench.runner import RunKey, RunRecord, load_cached, store, train_run
from kronlab.bench.tasks import load_convergence_task

GRID_EXPONENTS = (-2, -1, 0, 1)
GRID_FACTOR = 3.0


def lr_grid(default_lr: float) -> list[float]:
    return [float(f"{default_lr * GRID_FACTOR**k:.4g}") for k in GRID_EXPONENTS]


@dataclass
class OptimizerResult:
    """One optimizer on one task: its grid (lr → seed-0 final loss) and the runs at the best lr."""

    name: str
    algorithm: str
    grid: dict[float, float] = field(default_factory=dict)
    best_lr: float = math.nan
    runs: list[RunRecord] = field(default_factory=list)


def execute(key: RunKey, out: Path, show_progress: bool = True) -> RunRecord:
    """The run of ``key``: from the cache when it is there, else trained and cached."""
    cached = load_cached(out, key)
    if cached is not None:
        return cached
    record = train_run(load_convergence_task(key.task), resolve(key.optimizer), key,
                       show_progress=show_progress)  # fmt: skip
    store(out, record, key)
    return record


def _execute_in_worker(key: RunKey, out: Path, show_progress: bool, threads: int) -> RunRecord:
    torch.set_num_threads(threads)
    return execute(key, out, show_progress)


def execute_all(
    keys: Sequence[RunKey], out: Path, *, jobs: int = 1, show_progress: bool = True
) -> dict[RunKey, RunRecord]:
    """Every run of ``keys``; with ``jobs > 1`` the uncached ones run in parallel processes,
    each with an equal share of the torch threads."""
    results = {key: load_cached(out, key) for key in keys}
    missing = [key for key, record in results.items() if record is None]
    if jobs <= 1 or len(missing) <= 1:
        for key in missing:
            results[key] = execute(key, out, show_progress)
        return results  # type: ignore[return-value]
    threads = max(1, torch.get_num_threads() // jobs)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {
            key: pool.submit(_execute_in_worker, key, out, show_progress, threads)
            for key in missing
        }
        for key, future in futures.items():
            results[key] = future.result()
    return results  # type: ignore[return-value]


def run_task(
    task: str,
    specs: Sequence[OptimizerSpec],
    out: Path,
    *,
    seeds: int = 3,
    quick: bool = False,
    steps: int | None = None,
    jobs: int = 1,
    show_progress: bool = True,
    report: Callable[[str], None] = print,
) -> list[OptimizerResult]:
    """The protocol on one task for every spec (in the order given)."""
    definition = load_convergence_task(task)
    budget = steps if steps is not None else (definition.quick_steps if quick else definition.steps)
    if budget < 1:
        raise ValueError(f"steps must be >= 1, got {budget}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    grids = {
        spec.name: ([spec.default_lr] if quick else lr_grid(spec.default_lr)) for spec in specs
    }
    grid_keys = [
        RunKey(task, spec.name, lr, 0, budget) for spec in specs for lr in grids[spec.name]
    ]
    report(f"{task}: {budget} steps; grid: {len(grid_keys)} runs")
    grid_runs = execute_all(grid_keys, out, jobs=jobs, show_progress=show_progress)
    results = []
    for spec in specs:
        result = OptimizerResult(spec.name, spec.algorithm)
        for lr in grids[spec.name]:
            result.grid[lr] = grid_runs[RunKey(task, spec.name, lr, 0, budget)].final_val_loss
        result.best_lr = min(result.grid, key=lambda lr: result.grid[lr])
        results.append(result)
    seed_keys = {
        result.name: [RunKey(task, result.name, result.best_lr, s, budget) for s in range(seeds)]
        for result in results
    }
    more = [key for keys in seed_keys.values() for key in keys if key.seed > 0]
    if more:
        report(f"{task}: {len(more)} more seed runs at the best learning rates")
    seed_runs = {**grid_runs, **execute_all(more, out, jobs=jobs, show_progress=show_progress)}
    for result in results:
        result.runs = [seed_runs[key] for key in seed_keys[result.name]]
    return results
