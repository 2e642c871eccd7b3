"""Cost of the finite-step guarantee: the step as a transaction against a gradient check only.

Since the guarantee "a step leaves finite parameters and state, or is skipped untouched", a
step copies the state and parameters, updates, and checks the gradients, new parameters and new
state with one finiteness test (one host sync), rolling back if needed. Before, only the
gradients were checked. Both are timed here in one process on the benchmark MLP, interleaved:
the earlier step is reproduced exactly as ``on_nonfinite_grad="ignore"`` (the bare update)
behind the same gradient check.

    python -m benchmarks.step_guard [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import kronlab.optim  # noqa: F401  (registers every optimizer)
from benchmarks.common import (
    benchmark_mlp,
    format_ratio,
    machine_description,
    mlp_batch,
    time_optimizer_steps,
)
from kronlab.linalg.finite import all_finite
from kronlab.optim.base import KronOptimizer
from kronlab.optim.registry import available_optimizers, create_optimizer


class GradientCheckOnly:
    """The earlier step: refuse non-finite gradients, else update with no further check."""

    def __init__(self, optimizer: KronOptimizer) -> None:
        optimizer.on_nonfinite_grad = "ignore"
        self.optimizer = optimizer

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        grads = [
            p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None
        ]
        if all_finite(grads):
            self.optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch = mlp_batch()
    loss_fn = nn.functional.cross_entropy
    print(f"# {machine_description()}; MLP 256-512-512-10, batch 256, thread CPU time")
    print("| optimizer | gradient check only (ms) | transaction (ms) | ratio |")
    print("|---|---|---|---|")
    for name in available_optimizers():
        model = benchmark_mlp()
        optimizer = create_optimizer(name, model)
        if not isinstance(optimizer, KronOptimizer):
            continue  # torch's reference optimizers have neither
        old_model = benchmark_mlp()
        old = GradientCheckOnly(create_optimizer(name, old_model))
        times = {"old": [], "new": []}
        for _ in range(args.rounds):  # interleaved: both see the same machine load
            for key, (m, o) in {"old": (old_model, old), "new": (model, optimizer)}.items():
                seconds = time_optimizer_steps(
                    m, o, batch, loss_fn, steps=args.steps, clock=time.thread_time
                )
                times[key].append(seconds)
        old_s, new_s = min(times["old"]), min(times["new"])
        print(f"| {name} | {old_s * 1e3:.2f} | {new_s * 1e3:.2f} | {format_ratio(new_s, old_s)} |")


if __name__ == "__main__":
    main()
