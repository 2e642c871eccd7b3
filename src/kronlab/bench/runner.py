"""One benchmark run (task, optimizer, lr, seed, steps): train, record, cache as JSON.

A finished run is one JSON file named by its settings; a rerun with the same settings reads it
instead of training. The file is written atomically at the end of the run, so an interrupted run
leaves nothing behind and is simply run again: interrupting a benchmark loses at most the runs
in progress.

Under ``torchrun --nproc-per-node N`` a run is data-parallel over the N processes
(``kronlab.data_parallel``): the same global batches, so the same curve to float rounding;
rank 0 reads and writes the cache and the others take its word for what is cached.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kronlab.bench import schedule
from kronlab.bench.optimizers import OptimizerSpec
from kronlab.bench.tasks import ConvergenceTask
from kronlab.data_parallel import (
    agree_with_main,
    current_workers,
    distribute_optimizer,
    global_mean,
    local_share,
    wrap_model,
)
from kronlab.optim import optimizer_state_bytes

FORMAT_VERSION = 2
EVALUATIONS = 20  # validation points per run (plus the initial one)


@dataclass(frozen=True)
class RunKey:
    """The settings that determine a run's result (and name its cache file)."""

    task: str
    optimizer: str
    lr: float
    seed: int
    steps: int

    def filename(self) -> str:
        return f"{self.optimizer}_lr{self.lr:.4g}_seed{self.seed}_steps{self.steps}.json"

    def settings(self) -> dict[str, Any]:
        """Everything the result depends on besides the code: compared when reading a cache."""
        return {
            **asdict(self),
            "format": FORMAT_VERSION,
            "warmup_fraction": schedule.WARMUP_FRACTION,
            "final_fraction": schedule.FINAL_FRACTION,
            "weight_decay": schedule.WEIGHT_DECAY,
            "evaluations": EVALUATIONS,
        }


@dataclass
class RunRecord:
    """A run's validation curve and its summary figures.

    ``eval_steps``, ``val_loss``: the curve; ``seconds`` (wall clock) and ``cpu_seconds`` (CPU
    time of the process, all its threads) spent training before each evaluation, evaluation
    excluded. CPU time is what a shared machine leaves least disturbed (other jobs lengthen the
    wall clock, not the work done). ``val_items``: the validation loss of each item (``charlm``:
    each window) at each evaluation, for tasks that give it: what the noise of a difference
    between two evaluations is estimated from. Data-parallel, ``seconds``, ``cpu_seconds`` and
    ``state_bytes`` are rank 0's (its share of the sharded state).
    """

    settings: dict[str, Any]
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    val_items: list[list[float]] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    state_bytes: int = 0
    diverged: bool = False
    torch_threads: int = 0

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1] if self.val_loss and not self.diverged else math.inf


def eval_points(steps: int) -> set[int]:
    every = max(1, steps // EVALUATIONS)
    return {step for step in range(every, steps + 1, every)} | {steps}


def train_run(
    task: ConvergenceTask,
    spec: OptimizerSpec,
    key: RunKey,
    *,
    show_progress: bool = True,
) -> RunRecord:
    """Train ``task``'s model (weights and batches from ``key.seed``) with ``spec`` at ``key.lr``.

    A run stops early, marked diverged, at a non-finite training loss; it is also marked
    diverged when its final validation loss is above its initial one.
    """
    workers = current_workers()
    model = task.make_model(key.seed)
    trained = wrap_model(model, workers)
    torch.manual_seed(key.seed)  # optimizers that draw random numbers get one stream per seed
    optimizer = spec.factory(trained, key.lr)
    distribute_optimizer(optimizer, workers)
    shared = schedule.Schedule(optimizer, key.steps)
    record = RunRecord(settings=key.settings(), torch_threads=torch.get_num_threads())

    def evaluate(step: int, wall: float, cpu: float) -> None:
        record.eval_steps.append(step)
        record.seconds.append(wall)
        record.cpu_seconds.append(cpu)
        if task.validation_items is None:
            record.val_loss.append(task.validation_loss(model))
            return
        items = task.validation_items(model)
        record.val_loss.append(items.mean().item())
        record.val_items.append([round(value, 5) for value in items.tolist()])

    evaluate(0, 0.0, 0.0)
    evaluate_at = eval_points(key.steps)
    elapsed = cpu_elapsed = 0.0
    label = f"{task.name} {spec.name} lr={key.lr:.3g} seed={key.seed}"
    hidden = not show_progress or not workers.is_main
    with tqdm(total=key.steps, desc=label, unit="step", leave=False, disable=hidden) as bar:
        for step, batch in enumerate(task.batches(key.steps, key.seed), start=1):
            local, weight = local_share(batch, workers)
            started, cpu_started = time.perf_counter(), time.process_time()
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(trained, local)
            (loss * weight if weight != 1 else loss).backward()
            shared.before_step(step)
            optimizer.step()
            loss_value = loss.item()
            elapsed += time.perf_counter() - started
            cpu_elapsed += time.process_time() - cpu_started
            loss_value = global_mean(loss_value, weight, workers)
            record.train_loss.append(loss_value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
            if not math.isfinite(loss_value):
                record.diverged = True
                break
            if step in evaluate_at:
                evaluate(step, elapsed, cpu_elapsed)
    record.state_bytes = optimizer_state_bytes(optimizer)
    final = record.val_loss[-1]
    if not math.isfinite(final) or final > record.val_loss[0]:
        record.diverged = True
    return record


def cache_path(out: Path, key: RunKey) -> Path:
    return out / key.task / "runs" / key.filename()


def load_cached(out: Path, key: RunKey) -> RunRecord | None:
    """The cached record of ``key``, or None when absent, unreadable or made with other settings
    (rank 0's answer on every rank: the ranks run the same runs)."""
    workers = current_workers()
    return agree_with_main(_read_cached(out, key) if workers.is_main else None, workers)


def _read_cached(out: Path, key: RunKey) -> RunRecord | None:
    path = cache_path(out, key)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("settings") != key.settings():
        return None
    return RunRecord(**data)


def store(out: Path, record: RunRecord, key: RunKey) -> Path:
    """Write ``record`` atomically (a killed process never leaves a half-written run); on
    rank 0 only."""
    path = cache_path(out, key)
    if not current_workers().is_main:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(asdict(record), indent=1))
    os.replace(temporary, path)
    return path
