"""``kronlab bench convergence``: which optimizer reaches AdamW's loss sooner, in steps and time.

For each task: the protocol of :mod:`kronlab.bench.protocol` for each optimizer, then
``<out>/<task>/table.md``, ``<task>.png``, ``summary.json`` and one JSON per run under
``<out>/<task>/runs/`` (the cache: rerunning skips finished runs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from kronlab.bench.optimizers import REFERENCE, optimizer_names, resolve
from kronlab.bench.protocol import OptimizerResult, run_task
from kronlab.bench.report import (
    CLOCKS,
    format_table,
    last_fifth_drop,
    last_fifth_drop_stderr,
    plot,
    summarize,
    write_summary,
)
from kronlab.bench.tasks import TASK_NAMES, load_convergence_task
from kronlab.data_parallel import current_workers


def run_convergence(
    tasks: Sequence[str] = TASK_NAMES,
    optimizers: str = "kronlab",
    *,
    out: Path = Path("kronlab-bench"),
    seeds: int | None = None,
    quick: bool = False,
    steps: int | None = None,
    jobs: int = 1,
    show_progress: bool = True,
    clock: str = "cpu",
    report: Callable[[str], None] = print,
) -> dict[str, list[OptimizerResult]]:
    """Run the benchmark; returns each task's results and writes its outputs under ``out``.

    ``optimizers``: see :func:`kronlab.bench.optimizers.optimizer_names`; AdamW is always added
    (it is the reference). Peers whose package is missing are skipped with a message. ``quick``:
    each optimizer's default lr (no grid), the tasks' short budgets. ``seeds``: runs at the best
    (with ``quick``: the default) lr; 3 unless given, 1 with ``quick``. ``steps`` overrides every
    task's budget. ``clock``: the seconds of the table and plot, ``"cpu"`` (the process's CPU
    time) or ``"wall"``; runs record both.
    """
    for task in tasks:
        if task not in TASK_NAMES:
            raise ValueError(f"unknown task {task!r}; available: {', '.join(TASK_NAMES)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    workers = current_workers()
    if jobs > 1 and workers.distributed:
        raise ValueError(
            f"Invalid jobs: {jobs} under torchrun (allowed: 1; each run is already "
            f"data-parallel over the {workers.world_size} processes)"
        )
    if not workers.is_main:
        report = _silent  # rank 0 reports and writes the outputs
    names = optimizer_names(optimizers)
    if REFERENCE not in names:
        names.insert(0, REFERENCE)
    specs = [resolve(name) for name in names]  # unknown names fail before any training
    for spec in specs:
        if not spec.available():
            report(f"skipping {spec.name}: needs the {spec.package!r} package "
                   "(pip install 'kronlab[bench]')")  # fmt: skip
    specs = [spec for spec in specs if spec.available()]
    if seeds is None:
        seeds = 1 if quick else 3
    everything = {}
    for task in tasks:
        results = run_task(task, specs, out, seeds=seeds, quick=quick, steps=steps, jobs=jobs,
                           show_progress=show_progress, report=report)  # fmt: skip
        if not workers.is_main:
            everything[task] = results
            continue
        rows = summarize(results, clock)
        directory = out / task
        directory.mkdir(parents=True, exist_ok=True)
        table = format_table(rows, clock)
        (directory / "table.md").write_text(table + "\n")
        write_summary(directory / "summary.json", task, rows, results, clock)
        budget = results[0].runs[0].settings["steps"]
        profile = f"{seeds} seeds" if seeds > 1 else "1 seed"
        profile = f"quick, {profile}" if quick else profile
        title = f"{task}: {budget} steps, {profile}"
        written = [directory / "table.md", directory / "summary.json"]
        if plot(directory / f"{task}.png", title, results, clock):
            written.append(directory / f"{task}.png")
        else:
            report(f"matplotlib is not installed: skipped {task}.png (pip install 'kronlab[plot]')")
        report(f"\n{task} — {load_convergence_task(task).description}\n{table}")
        reference = next(r for r in results if r.name == REFERENCE)
        drop, stderr = last_fifth_drop(reference.runs), last_fifth_drop_stderr(reference.runs)
        noise = ""
        if math.isfinite(stderr):
            noise = f" (± {100 * stderr:.2f}% from the validation sample)"
        report(f"AdamW's validation loss fell {100 * drop:.1f}%{noise} over the last fifth of "
               "the run")  # fmt: skip
        report("wrote " + ", ".join(str(path) for path in written))
        everything[task] = results
    return everything


def _silent(message: str) -> None:
    """The report of the ranks other than 0."""
