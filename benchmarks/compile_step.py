"""``torch.compile(optimizer.step)`` against the eager step, per optimizer.

Run from the worktree root::

    PYTHONPATH=src python -m benchmarks.compile_step --rounds 30 --threads 1

Each optimizer steps its own copy of the benchmark MLP on one fixed gradient, kept allocated
(``zero_grad(set_to_none=False)`` semantics: a compiled step is reused only while the gradient
tensors are the same objects). Contenders: the eager step with the default synchronous
non-finite check (``"skip"``), the eager step with ``on_nonfinite_grad="mask"`` (no host sync,
the update undone on the device when a gradient is not finite), and the compiled ``"mask"``
step (inductor). Rounds interleave the contenders; the first ``--warm-up`` rounds (state
creation, compilation and the recompile that makes step counters dynamic) are not timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import benchmark_mlp, machine_description, mlp_batch
from kronlab.optim import PSGD, Muon

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "Muon": lambda model, mode: Muon(None, model=model, on_nonfinite_grad=mode),
    "PSGD": lambda model, mode: PSGD(model.parameters(), on_nonfinite_grad=mode),
}


def stepper(name: str, mode: str, compiled: bool) -> tuple[Callable[[], object], float]:
    """A zero-argument step of a fresh optimizer on the MLP's fixed gradient, and the seconds
    its warm-up (first steps, compilation) took."""
    model = benchmark_mlp()
    inputs, targets = mlp_batch()
    nn.functional.cross_entropy(model(inputs), targets).backward()
    optimizer = OPTIMIZERS[name](model, mode)
    step = torch.compile(optimizer.step) if compiled else optimizer.step
    started = time.perf_counter()
    optimizer.step()  # eager first step: state creation, the synchronously checked step
    for _ in range(2):  # the compile, then the recompile with dynamic step counters
        step()
    return step, time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine_description()}")
    print(f"command: {' '.join(sys.argv)}\n")
    contenders = {}
    warm_up = {}
    for name in OPTIMIZERS:
        for label, mode, compiled in (
            ("eager, skip (default)", "skip", False),
            ("eager, mask", "mask", False),
            ("compiled, mask", "mask", True),
        ):
            contenders[(name, label)], warm_up[(name, label)] = stepper(name, mode, compiled)
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in contenders}
    for _ in range(args.rounds):
        for key, step in contenders.items():
            started = time.perf_counter()
            step()
            samples[key].append(time.perf_counter() - started)
    print("| optimizer | step | ms (median) | vs eager default | warm-up s |")
    print("|---|---|---|---|---|")
    for (name, label), values in samples.items():
        median = statistics.median(values)
        reference = statistics.median(samples[(name, "eager, skip (default)")])
        print(
            f"| {name} | {label} | {1e3 * median:.2f} | {median / reference:.2f}x | "
            f"{warm_up[(name, label)]:.1f} |"
        )


if __name__ == "__main__":
    main()
