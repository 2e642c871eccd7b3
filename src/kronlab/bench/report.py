"""Per-task outputs: the table (Markdown), the plot (PNG) and the summary (JSON).

Reading: the target is AdamW's final validation loss (mean over its seeds). For every optimizer
the mean validation curve over its seeds is followed until it first reaches the target (linear
interpolation between evaluations); the steps and training seconds to get there are given, and
their ratios to AdamW's own (below 1: faster than AdamW). Seconds are the process's CPU time
(``clock="cpu"``, the default: what a machine shared with other jobs disturbs least) or the wall
clock (``clock="wall"``). ``±`` is half the min–max range over seeds; the plot's bands are that
range.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kronlab.bench.optimizers import REFERENCE
from kronlab.bench.protocol import OptimizerResult
from kronlab.bench.runner import RunRecord

CLOCKS = ("cpu", "wall")


@dataclass
class Row:
    optimizer: str
    lr: float
    lr_at_grid_edge: bool
    seeds: int
    diverged: int
    final_mean: float
    final_spread: float
    steps_to_target: float | None
    steps_ratio: float | None
    seconds_to_target: float | None
    seconds_ratio: float | None
    state_mib: float


def _check_clock(clock: str) -> None:
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")


def run_seconds(run: RunRecord, clock: str = "cpu") -> list[float]:
    """The run's training seconds at each evaluation on ``clock``."""
    _check_clock(clock)
    return run.cpu_seconds if clock == "cpu" else run.seconds


def mean_curve(
    runs: list[RunRecord], clock: str = "cpu"
) -> tuple[list[int], list[float], list[float]] | None:
    """Steps, mean validation loss and mean seconds (on ``clock``) over the runs that finished."""
    finished = [run for run in runs if not run.diverged]
    if not finished:
        return None
    steps = finished[0].eval_steps
    losses = [statistics.fmean(values) for values in zip(*(run.val_loss for run in finished))]
    seconds = [
        statistics.fmean(values) for values in zip(*(run_seconds(run, clock) for run in finished))
    ]
    return steps, losses, seconds


def first_crossing(
    steps: list[int], losses: list[float], seconds: list[float], target: float
) -> tuple[float, float] | None:
    """(step, seconds) where ``losses`` first reaches ``target``, linearly interpolated."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return float(steps[0]), seconds[0]
            fraction = (losses[i - 1] - target) / (losses[i - 1] - loss)
            return (
                steps[i - 1] + fraction * (steps[i] - steps[i - 1]),
                seconds[i - 1] + fraction * (seconds[i] - seconds[i - 1]),
            )
    return None


def _four_fifths(steps: list[int]) -> int:
    return min(range(len(steps)), key=lambda i: abs(steps[i] - 0.8 * steps[-1]))


def last_fifth_drop(runs: list[RunRecord]) -> float:
    """Relative fall of the mean validation loss over the last fifth of the steps: the budget
    should leave AdamW still improving (> 2%), so that optimizers differ there, not at rest."""
    curve = mean_curve(runs)
    if curve is None:
        return math.nan
    steps, losses, _ = curve
    start = _four_fifths(steps)
    return (losses[start] - losses[-1]) / losses[start]


def last_fifth_drop_stderr(runs: list[RunRecord]) -> float:
    """Standard error of :func:`last_fifth_drop` from the validation items (``charlm``: its
    windows): the items are a sample of the validation text, so the fall measured on them
    differs from the text's by about this much. Each item's fall (averaged over the seeds) is
    one observation of the same pair of evaluations; NaN without items."""
    finished = [run for run in runs if not run.diverged and run.val_items]
    if not finished:
        return math.nan
    start = _four_fifths(finished[0].eval_steps)
    before = torch.tensor([run.val_items[start] for run in finished], dtype=torch.float64)
    after = torch.tensor([run.val_items[-1] for run in finished], dtype=torch.float64)
    falls = ((before - after) / before.mean(dim=1, keepdim=True)).mean(dim=0)
    if len(falls) < 2:
        return math.nan
    return (falls.std() / math.sqrt(len(falls))).item()


def summarize(results: list[OptimizerResult], clock: str = "cpu") -> list[Row]:
    _check_clock(clock)
    reference = next((r for r in results if r.name == REFERENCE), None)
    reference_curve = mean_curve(reference.runs, clock) if reference else None
    target = statistics.fmean(reference_curve[1][-1:]) if reference_curve else math.nan
    reference_hit = (
        first_crossing(*reference_curve, target) if reference_curve is not None else None
    )
    rows = []
    for result in results:
        finals = [run.final_val_loss for run in result.runs if not run.diverged]
        curve = mean_curve(result.runs, clock)
        hit = first_crossing(*curve, target) if curve is not None else None
        lrs = sorted(result.grid)
        rows.append(
            Row(
                optimizer=result.name,
                lr=result.best_lr,
                lr_at_grid_edge=len(lrs) > 1 and result.best_lr in (lrs[0], lrs[-1]),
                seeds=len(result.runs),
                diverged=sum(run.diverged for run in result.runs),
                final_mean=statistics.fmean(finals) if finals else math.nan,
                final_spread=(max(finals) - min(finals)) / 2 if finals else math.nan,
                steps_to_target=hit[0] if hit else None,
                steps_ratio=hit[0] / reference_hit[0] if hit and reference_hit else None,
                seconds_to_target=hit[1] if hit else None,
                seconds_ratio=hit[1] / reference_hit[1] if hit and reference_hit else None,
                state_mib=max(run.state_bytes for run in result.runs) / 2**20,
            )
        )
    return rows


def _number(value: float | None, pattern: str, suffix: str = "") -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, pattern) + suffix


def format_table(rows: list[Row], clock: str = "cpu") -> str:
    """A Markdown table, one row per optimizer in the order run; ``clock`` names the seconds."""
    _check_clock(clock)
    seconds = "CPU seconds" if clock == "cpu" else "seconds"
    header = (
        f"| optimizer | lr | final val loss | steps to AdamW's | vs AdamW | {seconds} to AdamW's "
        "| vs AdamW | state MiB |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [header]
    for row in rows:
        lr = f"{row.lr:g}" + (" (grid edge)" if row.lr_at_grid_edge else "")
        final = f"{_number(row.final_mean, '.4f')} ± {_number(row.final_spread, '.4f')}"
        if row.diverged:
            final += f" ({row.diverged}/{row.seeds} diverged)"
        lines.append(
            f"| {row.optimizer} | {lr} | {final} | {_number(row.steps_to_target, '.0f')} "
            f"| {_number(row.steps_ratio, '.2f', 'x')} | {_number(row.seconds_to_target, '.1f')} "
            f"| {_number(row.seconds_ratio, '.2f', 'x')} | {row.state_mib:.2f} |"
        )
    return "\n".join(lines)


def write_summary(
    path: Path, task: str, rows: list[Row], results: list[OptimizerResult], clock: str = "cpu"
) -> None:
    reference = next((r for r in results if r.name == REFERENCE), None)
    payload = {
        "task": task,
        "clock": clock,
        "adamw_last_fifth_drop": last_fifth_drop(reference.runs) if reference else None,
        "adamw_last_fifth_drop_stderr": last_fifth_drop_stderr(reference.runs)
        if reference
        else None,
        "rows": [asdict(row) for row in rows],
        "grids": {r.name: {f"{lr:g}": loss for lr, loss in r.grid.items()} for r in results},
    }
    path.write_text(json.dumps(payload, indent=1))


def plot(path: Path, title: str, results: list[OptimizerResult], clock: str = "cpu") -> bool:
    """Validation loss against steps and against seconds (on ``clock``); False when matplotlib
    is missing."""
    _check_clock(clock)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.get_cmap("tab20").colors
    for index, result in enumerate(results):
        finished = [run for run in result.runs if not run.diverged]
        curve = mean_curve(result.runs, clock)
        if curve is None:
            continue
        steps, losses, seconds = curve
        low = [min(values) for values in zip(*(run.val_loss for run in finished))]
        high = [max(values) for values in zip(*(run.val_loss for run in finished))]
        colour = colours[index % len(colours)]
        label = f"{result.name} (lr {result.best_lr:g})"
        for axis, x in ((axes[0], steps), (axes[1], seconds)):
            axis.plot(x, losses, color=colour, label=label)
            axis.fill_between(x, low, high, color=colour, alpha=0.2, linewidth=0)
    seconds = "training CPU seconds" if clock == "cpu" else "training seconds (wall clock)"
    for axis, xlabel in ((axes[0], "step"), (axes[1], f"{seconds}, evaluation excluded")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel("validation loss")
        axis.set_yscale("log")
        axis.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize="small", loc="upper right")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
