"""Train one model on a task with several optimizers and compare loss, accuracy and speed."""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kronlab.data_parallel import (
    distribute_optimizer,
    global_mean,
    local_share,
    wrap_model,
)
from kronlab.distributed.workers import Workers
from kronlab.optim.registry import create_optimizer, get_optimizer
from kronlab.tasks.base import ClassificationTask
from kronlab.timing import (
    MIN_BLOCKS,
    NOISE_LIMIT,
    STEP_BLOCK,
    block_size,
    interleaved_order,
    time_ratio,
)

REFERENCE_OPTIMIZER = "adamw"


@dataclass
class RunResult:
    """One optimizer's run: curves, final metrics, timing.

    ``ratio_to_adamw`` is the median over blocks of steps of this run's step time divided by
    AdamW's over the same (interleaved) steps; ``ratio_low``/``ratio_high`` are the quartiles
    of those per-block ratios and ``timing_noisy`` says that their spread makes the figure
    unreliable (see :mod:`kronlab.timing`).
    """

    name: str
    lr: float
    train_loss_curve: list[float] = field(default_factory=list)
    test_loss_curve: list[tuple[int, float]] = field(default_factory=list)
    final_train_loss: float = math.nan
    test_loss: float = math.nan
    test_accuracy: float = math.nan
    ms_per_step: float = math.nan
    ratio_to_adamw: float = math.nan
    ratio_low: float = math.nan
    ratio_high: float = math.nan
    timed_blocks: int = 0
    timing_noisy: bool = True
    diverged: bool = False


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: ClassificationTask) -> tuple[float, float]:
    """Test loss and accuracy of ``model`` on the task's test split."""
    model.eval()
    logits = model(task.test_inputs)
    model.train()
    loss = task.loss(logits, task.test_targets).item()
    accuracy = (logits.argmax(dim=-1) == task.test_targets).float().mean().item()
    return loss, accuracy


def batch_schedule(num_examples: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """``(steps, batch_size)`` example indices: shuffled epochs, identical for every optimizer."""
    generator = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch_size / num_examples) + 1
    order = torch.cat([torch.randperm(num_examples, generator=generator) for _ in range(epochs)])
    return order[: steps * batch_size].reshape(steps, batch_size)


class TrainingRun:
    """One optimizer training the task's model (weights from ``seed``), one step at a time, so
    that several runs can take their steps in interleaved slots.

    Each run keeps its own stream of the global torch RNG (PSGD's noise, Spectron's
    power-iteration start), restored around its steps: its curve does not depend on which
    other runs share the comparison or in which order their slots fall.

    Over several ranks (``workers``, under torchrun) the run is data-parallel: DDP, each rank
    its share of every batch, the optimizer's preconditioner work split over the ranks
    (``kronlab.data_parallel``); the loss curve is the global batch's.
    """

    def __init__(
        self,
        task: ClassificationTask,
        optimizer_name: str,
        lr: float,
        *,
        steps: int,
        batch_size: int,
        seed: int,
        eval_every: int,
        workers: Workers | None = None,
    ) -> None:
        self.task = task
        self.workers = workers or Workers()
        self.model = task.make_model(seed)
        self.trained = wrap_model(self.model, self.workers)
        torch.manual_seed(seed)
        self.optimizer = create_optimizer(optimizer_name, self.trained, lr)
        distribute_optimizer(self.optimizer, self.workers)
        self.rng_state = torch.get_rng_state()
        self.result = RunResult(name=optimizer_name, lr=lr)
        self.schedule = batch_schedule(len(task.train_inputs), steps, batch_size, seed)
        self.eval_every = eval_every
        self.step_seconds: list[float] = []
        self.finished = False

    def step(self, step: int, clock: Callable[[], float] = time.perf_counter) -> None:
        """Train step ``step`` (from 1); the timed part is zero_grad, forward, backward, step
        (data-parallel: on this rank's share, with DDP's gradient all-reduce and the sharded
        optimizer's collectives, in which the ranks wait for each other)."""
        indices = self.schedule[step - 1]
        batch = self.task.train_inputs[indices], self.task.train_targets[indices]
        (inputs, targets), weight = local_share(batch, self.workers)
        torch.set_rng_state(self.rng_state)
        started = clock()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.task.loss(self.trained(inputs), targets)
        (loss * weight if weight != 1 else loss).backward()
        self.optimizer.step()
        self.step_seconds.append(clock() - started)
        self.rng_state = torch.get_rng_state()
        loss_value = global_mean(loss.item(), weight, self.workers)
        self.result.train_loss_curve.append(loss_value)
        if not math.isfinite(loss_value):
            self.result.diverged = True
            self.finished = True
        elif step % self.eval_every == 0 or step == len(self.schedule):
            self.result.test_loss_curve.append((step, evaluate(self.model, self.task)[0]))
            self.finished = step == len(self.schedule)

    def finish(self) -> RunResult:
        result = self.result
        result.ms_per_step = step_ms(self.step_seconds)
        result.final_train_loss = result.train_loss_curve[-1]
        if not result.diverged:
            result.test_loss, result.test_accuracy = evaluate(self.model, self.task)
        return result


def run_interleaved(
    runs: list[TrainingRun],
    steps: int,
    *,
    clock: Callable[[], float] = time.perf_counter,
    progress: tqdm | None = None,
) -> None:
    """Step every run through ``steps`` steps, step ``k`` of all runs in consecutive slots (in
    :func:`kronlab.timing.interleaved_order`) before step ``k + 1`` of any."""
    for step in range(1, steps + 1):
        for index in interleaved_order(len(runs), step):
            run = runs[index]
            if run.finished:
                continue
            run.step(step, clock)
            if progress is not None:
                progress.update(1 if not run.finished else steps - step + 1)
                loss = run.result.train_loss_curve[-1]
                progress.set_postfix(optimizer=run.result.name, loss=f"{loss:.3f}", refresh=False)


def train_one(
    task: ClassificationTask,
    optimizer_name: str,
    lr: float,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    eval_every: int,
    progress: tqdm | None = None,
    workers: Workers | None = None,
) -> RunResult:
    """Train the task's model (weights from ``seed``) with one registered optimizer."""
    run = TrainingRun(
        task,
        optimizer_name,
        lr,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        eval_every=eval_every,
        workers=workers,
    )
    run_interleaved([run], steps, progress=progress)
    return run.finish()


def step_ms(step_seconds: list[float], block: int = STEP_BLOCK) -> float:
    """Milliseconds per step: the median over blocks of ``block`` consecutive steps of each
    block's mean, the first block left out.

    Block means keep amortized work (a refresh every 10 steps) in the figure; the median over
    blocks drops the blocks hit by one-time costs (state allocation, the process's lazy kernel
    and thread-pool start-up for whichever optimizer runs first, seen at over a second and
    for tens of steps after) or by other jobs on a shared machine, which would otherwise
    dominate a 200-step mean: a fresh venv's AdamW once read 13–26 ms/step instead of ~1.
    Runs shorter than three blocks fall back to the mean without their first tenth.
    """
    if not step_seconds:
        return math.nan
    if len(step_seconds) < 3 * block:
        warmup = max(1, len(step_seconds) // 10) if len(step_seconds) > 1 else 0
        timed = step_seconds[warmup:]
        return 1000 * sum(timed) / len(timed)
    means = [
        sum(step_seconds[start : start + block]) / block
        for start in range(block, len(step_seconds) - block + 1, block)
    ]
    return 1000 * statistics.median(means)


def compare(
    task: ClassificationTask,
    optimizer_names: list[str],
    *,
    steps: int = 200,
    batch_size: int = 64,
    seed: int = 0,
    learning_rates: dict[str, float] | None = None,
    show_progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
    workers: Workers | None = None,
) -> list[RunResult]:
    """Run every optimizer on ``task`` from the same initial weights and batches.

    The optimizers take their steps in interleaved slots (step ``k`` of each before step
    ``k + 1`` of any), so all see the same machine load; AdamW is always run (it is the
    step-time reference) and reported like the others. ``clock`` times the steps. ``workers``
    (several ranks under torchrun): every run is data-parallel (see ``TrainingRun``); the step
    times are each rank's own (bounded by the collectives, in which the ranks wait for each
    other) and only rank 0 shows progress.
    """
    for name in optimizer_names:
        get_optimizer(name)  # unknown names fail before any training
    learning_rates = learning_rates or {}
    unknown = sorted(set(learning_rates) - set(optimizer_names))
    if unknown:
        raise ValueError(f"--lr names optimizers that are not being compared: {unknown}")
    names = list(dict.fromkeys(optimizer_names))
    if REFERENCE_OPTIMIZER not in names:
        names.append(REFERENCE_OPTIMIZER)
    eval_every = max(1, steps // 20)
    runs = [
        TrainingRun(
            task,
            name,
            learning_rates.get(name, get_optimizer(name).default_lr),
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            eval_every=eval_every,
            workers=workers,
        )
        for name in names
    ]
    show_progress = show_progress and (workers is None or workers.is_main)
    with tqdm(total=steps * len(names), disable=not show_progress, unit="step") as progress:
        run_interleaved(runs, steps, clock=clock, progress=progress)
    results = [run.finish() for run in runs]
    reference = runs[names.index(REFERENCE_OPTIMIZER)]
    for run, result in zip(runs, results):
        ratio = time_ratio(run.step_seconds, reference.step_seconds, block_size(steps))
        result.ratio_to_adamw, result.ratio_low, result.ratio_high = (
            ratio.median,
            ratio.low,
            ratio.high,
        )
        result.timed_blocks, result.timing_noisy = ratio.blocks, ratio.noisy
    return results


def format_table(results: list[RunResult]) -> str:
    header = (
        "optimizer",
        "lr",
        "train loss",
        "test loss",
        "test acc",
        "ms/step",
        "time / AdamW (quartiles)",
    )
    rows = [
        (
            r.name + (" (diverged)" if r.diverged else ""),
            f"{r.lr:g}",
            f"{r.final_train_loss:.4f}",
            f"{r.test_loss:.4f}",
            f"{100 * r.test_accuracy:.1f}%",
            f"{r.ms_per_step:.2f}",
            format_ratio(r),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_ratio(result: RunResult) -> str:
    """``'1.93x (1.85-2.02)'``, with ``' ?'`` when the spread says the figure is noise."""
    if not math.isfinite(result.ratio_to_adamw):
        return "n/a"
    text = f"{result.ratio_to_adamw:.2f}x"
    if math.isfinite(result.ratio_low):
        text += f" ({result.ratio_low:.2f}-{result.ratio_high:.2f})"
    return text + (" ?" if result.timing_noisy else "")


def timing_warning(results: list[RunResult]) -> str | None:
    """A note for the table when some time ratios are noise (``None`` when all are sound)."""
    noisy = [r for r in results if r.timing_noisy and r.name != REFERENCE_OPTIMIZER]
    if not noisy:
        return None
    if any(r.timed_blocks < MIN_BLOCKS for r in noisy):
        reason = (
            f"fewer than {MIN_BLOCKS} blocks of steps were timed, too few to measure the spread"
        )
    else:
        reason = (
            "their per-block ratios spread by more than "
            f"{NOISE_LIMIT:.0%} of the median (other jobs on this machine, or too few steps)"
        )
    return (
        f"warning: the time ratios marked '?' ({', '.join(r.name for r in noisy)}) are noise: "
        f"{reason}. Rerun on an idle machine or with more --steps before reading them."
    )


def write_json(results: list[RunResult], path: Path, config: dict) -> None:
    payload = {
        "config": config,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "results": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(payload, indent=2))


def line_styles(count: int) -> list[dict[str, object]]:
    """A distinct (colour, dash pattern) pair per curve: 10 tab10 colours, then the same
    colours dashed, dotted, dash-dotted, so up to 40 curves never share both."""
    dashes = ("-", "--", ":", "-.")
    return [
        {"color": f"C{index % 10}", "linestyle": dashes[(index // 10) % len(dashes)]}
        for index in range(count)
    ]


def plot_curves(results: list[RunResult], path: Path, title: str) -> bool:
    """Train (smoothed) and test loss curves per optimizer; False if matplotlib is missing.

    Each optimizer has its own colour and line style; the legend sits right of the axes so
    it hides no curve however many optimizers are compared.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (train_axis, test_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r, style in zip(results, line_styles(len(results))):
        curve = torch.tensor(r.train_loss_curve)
        window = max(1, len(curve) // 25)
        smoothed = curve.unfold(0, window, 1).mean(dim=1) if len(curve) >= window else curve
        train_axis.plot(
            range(window, window + len(smoothed)), smoothed.tolist(), label=r.name, **style
        )
        if r.test_loss_curve:
            steps, losses = zip(*r.test_loss_curve)
            test_axis.plot(steps, losses, marker=".", markersize=4, label=r.name, **style)
    for axis, label in ((train_axis, "train loss (moving average)"), (test_axis, "test loss")):
        axis.set_xlabel("step")
        axis.set_ylabel(label)
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    handles, labels = train_axis.get_legend_handles_labels()
    figure.legend(
        handles,
        labels,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        ncol=1 if len(labels) <= 20 else 2,
        frameon=False,
    )
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return True
