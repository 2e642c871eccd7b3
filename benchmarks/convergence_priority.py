"""The convergence protocol in priority order, for budgets too small to run all of it.

Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m benchmarks.convergence_priority \
        --task charlm --steps N --optimizers adamw,soap,muon,... [--seeds 3] [--jobs 2] \
        [--out kronlab-bench] [--report-only]

The runs are those of ``kronlab bench convergence`` (same keys, same cache), queued so that an
interrupted session leaves the most useful ones finished: each optimizer's grid in the order
given, the points nearest its default first (×1, ×3, ×1/3, then ×1/9 only where ×1/3 leads), then
the extra seeds at each best lr, optimizer by optimizer. ``--report-only`` trains nothing and
writes the table, plot and summary of whatever is cached (an optimizer whose grid is incomplete
is marked so in its best-lr column). ``kronlab bench convergence`` with the same settings runs
what is missing and reuses the rest.
"""

from __future__ import annotations

import argparse
import math
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path

from kronlab.bench.optimizers import REFERENCE, OptimizerSpec, optimizer_names, resolve
from kronlab.bench.protocol import GRID_EXPONENTS, OptimizerResult, execute, lr_grid
from kronlab.bench.report import format_table, last_fifth_drop, plot, summarize, write_summary
from kronlab.bench.runner import RunKey, load_cached

# Grid exponents in the order they are run; the lowest is run only when the next one up leads.
ORDER = (0, 1, -1)
LOWEST = min(GRID_EXPONENTS)


def _lr(spec: OptimizerSpec, exponent: int) -> float:
    return lr_grid(spec.default_lr)[GRID_EXPONENTS.index(exponent)]


def grid_losses(task: str, spec: OptimizerSpec, steps: int, out: Path) -> dict[float, float]:
    """The cached seed-0 grid points of ``spec``: lr → final validation loss."""
    losses = {}
    for lr in lr_grid(spec.default_lr):
        record = load_cached(out, RunKey(task, spec.name, lr, 0, steps))
        if record is not None:
            losses[lr] = record.final_val_loss
    return losses


def needs_lowest(task: str, spec: OptimizerSpec, steps: int, out: Path) -> bool:
    losses = grid_losses(task, spec, steps, out)
    second = _lr(spec, LOWEST + 1)
    return bool(losses) and min(losses, key=losses.__getitem__) == second


def result_from_cache(
    task: str, spec: OptimizerSpec, steps: int, seeds: int, out: Path
) -> OptimizerResult | None:
    """The protocol's result from the cached runs; None when no grid point is there."""
    grid = grid_losses(task, spec, steps, out)
    if not grid:
        return None
    result = OptimizerResult(spec.name, spec.algorithm, grid=grid)
    result.best_lr = min(grid, key=grid.__getitem__)
    for seed in range(seeds):
        record = load_cached(out, RunKey(task, spec.name, result.best_lr, seed, steps))
        if record is not None:
            result.runs.append(record)
    return result


def report(task: str, specs: list[OptimizerSpec], steps: int, seeds: int, out: Path) -> None:
    results = [r for s in specs if (r := result_from_cache(task, s, steps, seeds, out))]
    rows = summarize(results)
    partial = {
        r.name for r in results if len(r.grid) < len(GRID_EXPONENTS) and not (
            len(r.grid) == len(ORDER) and _lr(resolve(r.name), LOWEST + 1) != r.best_lr
        )
    }  # fmt: skip
    directory = out / task
    directory.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    for name in partial:
        table = table.replace(f"| {name} |", f"| {name} (grid incomplete) |")
    (directory / "table.md").write_text(table + "\n")
    write_summary(directory / "summary.json", task, rows, results)
    plot(directory / f"{task}.png", f"{task}: {steps} steps", results)
    print(table)
    for result in results:
        grid = ", ".join(f"{lr:g}: {loss:.4f}" for lr, loss in sorted(result.grid.items()))
        print(f"{result.name}: seeds {len(result.runs)}; grid {grid}")
    reference = next((r for r in results if r.name == REFERENCE), None)
    if reference is not None:
        print(f"AdamW's last-fifth fall: {100 * last_fifth_drop(reference.runs):.2f}%")


def run(
    task: str, specs: list[OptimizerSpec], steps: int, seeds: int, jobs: int, out: Path
) -> None:
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        grid = {
            spec.name: [
                pool.submit(execute, RunKey(task, spec.name, _lr(spec, k), 0, steps), out, False)
                for k in ORDER
            ]
            for spec in specs
        }
        for spec in specs:
            wait(grid[spec.name])
            if needs_lowest(task, spec, steps, out):
                key = RunKey(task, spec.name, _lr(spec, LOWEST), 0, steps)
                grid[spec.name].append(pool.submit(execute, key, out, False))
        more = []
        for spec in specs:
            wait(grid[spec.name])
            for future in grid[spec.name]:
                future.result()  # a failed run raises here
            losses = grid_losses(task, spec, steps, out)
            best = min(losses, key=losses.__getitem__)
            if math.isfinite(losses[best]):
                for seed in range(1, seeds):
                    key = RunKey(task, spec.name, best, seed, steps)
                    more.append(pool.submit(execute, key, out, False))
        for future in more:
            future.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="charlm")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--optimizers", default="kronlab")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("kronlab-bench"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    specs = [resolve(name) for name in optimizer_names(args.optimizers)]
    specs = [spec for spec in specs if spec.available()]
    if not args.report_only:
        run(args.task, specs, args.steps, args.seeds, args.jobs, args.out)
    report(args.task, specs, args.steps, args.seeds, args.out)


if __name__ == "__main__":
    main()
