"""``torch.compile(optimizer.step)`` against the eager step, for every registered kronlab optimizer.

Run from the worktree root::

    PYTHONPATH=src python -m benchmarks.compile_step --rounds 30 --threads 1

Each optimizer (as the registry builds it) steps its own copy of the benchmark MLP on one fixed
gradient, kept allocated (``zero_grad(set_to_none=False)`` semantics: a compiled step is reused
only while the gradient tensors are the same objects). Contenders: the eager step with the
default synchronous non-finite check (``"skip"``), the eager step with
``on_nonfinite_grad="mask"`` (no host sync, the update undone on the device when a gradient is
not finite), and the compiled ``"mask"`` step (inductor). The warm-up (state creation, the
first eager step, then two whole refresh periods compiled: every graph, the refresh steps'
included, and the recompile that makes the step counters dynamic) is not timed. The timed
rounds interleave the three contenders and are a whole number of refresh periods
(``precondition_frequency``), so the mean step time includes the amortized refreshes; the
median is the step between refreshes.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch._dynamo.utils import counters

from benchmarks.common import benchmark_mlp, machine_description, mlp_batch
from kronlab.optim import KronOptimizer, available_optimizers, create_optimizer

CONTENDERS = (
    ("eager, skip (default)", "skip", False),
    ("eager, mask", "mask", False),
    ("compiled, mask", "mask", True),
)


def kronlab_optimizers() -> list[str]:
    """The registered optimizers that are kronlab's (not torch.optim's baselines)."""
    return [
        name
        for name in available_optimizers()
        if isinstance(create_optimizer(name, nn.Linear(2, 2)), KronOptimizer)
    ]


def refresh_period(optimizer: torch.optim.Optimizer) -> int:
    """The steps after which an amortized optimizer's work repeats (1 if it has none)."""
    period = 1
    for group in optimizer.param_groups:
        for key in ("precondition_frequency", "T"):
            value = group.get(key)
            if isinstance(value, int) and value > 0:
                period = math.lcm(period, value)
    return period


def stepper(name: str, mode: str, compiled: bool) -> tuple[Callable[[], object], int, float]:
    """A zero-argument step of a fresh optimizer on the MLP's fixed gradient, its refresh
    period, and the seconds its warm-up (first steps, compilation) took."""
    model = benchmark_mlp()
    inputs, targets = mlp_batch()
    nn.functional.cross_entropy(model(inputs), targets).backward()
    optimizer = create_optimizer(name, model)
    optimizer.on_nonfinite_grad = mode  # type: ignore[attr-defined]
    period = refresh_period(optimizer)
    step = torch.compile(optimizer.step) if compiled else optimizer.step
    started = time.perf_counter()
    optimizer.step()  # eager first step: state creation, the synchronously checked step
    for _ in range(2 * period + 1):  # every graph compiled: both refresh periods' steps
        step()
    return step, period, time.perf_counter() - started


def compare(name: str, rounds: int) -> list[str]:
    """The table rows of one optimizer's three contenders, timed interleaved."""
    contenders = {}
    warm_up = {}
    periods = set()
    # one optimizer's graphs at a time: the step's code is shared by every optimizer, and
    # Dynamo's cache per code object is bounded (recompile_limit)
    torch._dynamo.reset()
    counters.clear()
    for label, mode, compiled in CONTENDERS:
        step, period, seconds = stepper(name, mode, compiled)
        contenders[label], warm_up[label] = step, seconds
        periods.add(period)
    graphs = counters["stats"]["unique_graphs"]
    period = max(periods)
    timed = period * max(1, math.ceil(rounds / period))  # whole refresh periods
    samples: dict[str, list[float]] = {label: [] for label in contenders}
    for _ in range(timed):
        for label, step in contenders.items():
            started = time.perf_counter()
            step()
            samples[label].append(time.perf_counter() - started)
    if counters["stats"]["unique_graphs"] != graphs:
        print(f"warning: {name} compiled again while timed", file=sys.stderr)
    reference = statistics.mean(samples[CONTENDERS[0][0]])
    rows = []
    for label, values in samples.items():
        compiled_graphs = graphs if label == CONTENDERS[2][0] else ""
        mean, median = statistics.mean(values), statistics.median(values)
        rows.append(
            f"| {name} | {label} | {1e3 * mean:.2f} | {1e3 * median:.2f} | "
            f"{mean / reference:.2f}x | {warm_up[label]:.1f} | {compiled_graphs} |"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed steps (whole periods)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", nargs="*", default=None, help="registry names to run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only or kronlab_optimizers()
    print(f"machine: {machine_description()}")
    print(f"command: {' '.join(sys.argv)}\n")
    print(
        "| optimizer | step | ms (mean) | ms (median) | mean vs eager default | warm-up s "
        "| graphs |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in names:
        for row in compare(name, args.rounds):
            print(row, flush=True)


if __name__ == "__main__":
    main()
