"""Train one model on a task with several optimizers and compare loss, accuracy and speed."""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kronlab.optim.registry import create_optimizer, get_optimizer
from kronlab.tasks.base import ClassificationTask

REFERENCE_OPTIMIZER = "adamw"


@dataclass
class RunResult:
    """One optimizer's run: curves, final metrics, timing."""

    name: str
    lr: float
    train_loss_curve: list[float] = field(default_factory=list)
    test_loss_curve: list[tuple[int, float]] = field(default_factory=list)
    final_train_loss: float = math.nan
    test_loss: float = math.nan
    test_accuracy: float = math.nan
    ms_per_step: float = math.nan
    ratio_to_adamw: float = math.nan
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
) -> RunResult:
    """Train the task's model (weights from ``seed``) with one registered optimizer."""
    model = task.make_model(seed)
    # Optimizers that draw random numbers (PSGD's noise, Spectron's power-iteration start) get
    # the same stream whichever optimizers ran before them in this comparison.
    torch.manual_seed(seed)
    optimizer = create_optimizer(optimizer_name, model, lr)
    result = RunResult(name=optimizer_name, lr=lr)
    schedule = batch_schedule(len(task.train_inputs), steps, batch_size, seed)
    step_seconds: list[float] = []
    for step, indices in enumerate(schedule, start=1):
        inputs, targets = task.train_inputs[indices], task.train_targets[indices]
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        step_seconds.append(time.perf_counter() - started)
        loss_value = loss.item()
        result.train_loss_curve.append(loss_value)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(optimizer=optimizer_name, loss=f"{loss_value:.3f}", refresh=False)
        if not math.isfinite(loss_value):
            result.diverged = True
            if progress is not None:
                progress.update(steps - step)
            break
        if step % eval_every == 0 or step == steps:
            result.test_loss_curve.append((step, evaluate(model, task)[0]))
    result.ms_per_step = step_ms(step_seconds)
    result.final_train_loss = result.train_loss_curve[-1]
    if not result.diverged:
        result.test_loss, result.test_accuracy = evaluate(model, task)
    return result


STEP_BLOCK = 20  # steps per timing block: a multiple of the registered precondition periods


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
) -> list[RunResult]:
    """Run every optimizer on ``task`` from the same initial weights and batches.

    AdamW is always timed (it is the step-time reference); it is reported like the others.
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
    results = []
    with tqdm(total=steps * len(names), disable=not show_progress, unit="step") as progress:
        for name in names:
            lr = learning_rates.get(name, get_optimizer(name).default_lr)
            results.append(
                train_one(
                    task,
                    name,
                    lr,
                    steps=steps,
                    batch_size=batch_size,
                    seed=seed,
                    eval_every=eval_every,
                    progress=progress,
                )
            )
    reference = next(r for r in results if r.name == REFERENCE_OPTIMIZER)
    for result in results:
        result.ratio_to_adamw = result.ms_per_step / reference.ms_per_step
    return results


def format_table(results: list[RunResult]) -> str:
    header = ("optimizer", "lr", "train loss", "test loss", "test acc", "ms/step", "vs AdamW")
    rows = [
        (
            r.name + (" (diverged)" if r.diverged else ""),
            f"{r.lr:g}",
            f"{r.final_train_loss:.4f}",
            f"{r.test_loss:.4f}",
            f"{100 * r.test_accuracy:.1f}%",
            f"{r.ms_per_step:.2f}",
            f"{r.ratio_to_adamw:.2f}x",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


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


def plot_curves(results: list[RunResult], path: Path, title: str) -> bool:
    """Train (smoothed) and test loss curves per optimizer; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (train_axis, test_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        curve = torch.tensor(r.train_loss_curve)
        window = max(1, len(curve) // 25)
        smoothed = curve.unfold(0, window, 1).mean(dim=1) if len(curve) >= window else curve
        train_axis.plot(range(window, window + len(smoothed)), smoothed.tolist(), label=r.name)
        if r.test_loss_curve:
            steps, losses = zip(*r.test_loss_curve)
            test_axis.plot(steps, losses, marker=".", label=r.name)
    for axis, label in ((train_axis, "train loss (moving average)"), (test_axis, "test loss")):
        axis.set_xlabel("step")
        axis.set_ylabel(label)
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
