"""Sharded optimizers on gloo CPU processes: per-rank preconditioner time, state, all-gather.

Run from the worktree root::

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m benchmarks.distributed --ranks 1 2 3

For each optimizer and each number of ranks N, N processes step the 4-layer transformer of
``benchmarks.common`` on the same batch (every rank sees the same gradients, as under DDP; the
gradient all-reduce is DDP's and not timed here). Per rank and step it measures the time of the
rank's own update (``KronOptimizer.update`` on the bundles it owns: the preconditioner work),
as thread CPU time (the processes share the machine's cores, so wall time would count waiting)
and wall time; the wall time of the all-gather of the owners' results and of all the step's
collectives (that all-gather, the outcome all-reduce, PSGD's initial-scale all-reduce); the
whole ``optimizer.step()``; and the bytes of the rank's optimizer state. N = 1 runs the
undistributed optimizer. Reported: the slowest rank's preconditioner time, the largest rank's
state, the ranks' mean shares and step time, as ratios to N = 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kronlab.optim.psgd as psgd_module
import kronlab.optim.sharded_step as sharded_step
from benchmarks.common import (
    benchmark_transformer,
    language_model_loss,
    machine_description,
    transformer_batch,
)
from kronlab.distributed import DistributedConfig
from kronlab.optim import PSGD, SOAP, KronOptimizer, Muon, Shampoo, SIRFShampoo
from kronlab.optim.hybrid import optimizer_state_bytes

FREQUENCY = 5  # steps between decompositions; timed over whole periods
# the collectives as imported, wrapped afresh for each optimizer measured
ALL_GATHER = sharded_step.all_gather_owned
AGREE_ON_OUTCOME = sharded_step.agree_on_outcome
ALL_REDUCE_MAX = psgd_module.all_reduce_max
OPTIMIZERS: dict[str, Callable[..., KronOptimizer]] = {
    "muon": lambda model, config: Muon(model=model, lr=0.02, distributed=config),
    "psgd": lambda model, config: PSGD(model.parameters(), lr=1e-3, distributed=config),
    "sirfshampoo": lambda model, config: SIRFShampoo(model, lr=1e-3, distributed=config),
    "shampoo": lambda model, config: Shampoo(
        model.parameters(), lr=1e-3, precondition_frequency=FREQUENCY, distributed=config
    ),
    "soap": lambda model, config: SOAP(
        model.parameters(), lr=1e-3, precondition_frequency=FREQUENCY, distributed=config
    ),
}


class Stopwatch:
    """Accumulated wall and thread-CPU seconds of the calls of a wrapped function."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def wrap(self, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.wall.append(time.perf_counter() - wall)
                self.cpu.append(time.thread_time() - cpu)

        return timed


def measure(name: str, rank: int, world_size: int, warmup: int, steps: int) -> dict[str, float]:
    model = benchmark_transformer()
    config = DistributedConfig() if world_size > 1 else None
    optimizer = OPTIMIZERS[name](model, config)
    inputs, targets = transformer_batch()
    update, gather, communication, step = Stopwatch(), Stopwatch(), Stopwatch(), Stopwatch()
    optimizer.update = update.wrap(optimizer.update)
    sharded_step.all_gather_owned = communication.wrap(gather.wrap(ALL_GATHER))
    sharded_step.agree_on_outcome = communication.wrap(AGREE_ON_OUTCOME)
    psgd_module.all_reduce_max = communication.wrap(ALL_REDUCE_MAX)
    for index in range(warmup + steps):
        if index == warmup:
            for watch in (update, gather, communication, step):
                watch.wall.clear()
                watch.cpu.clear()
        optimizer.zero_grad()
        language_model_loss(model(inputs), targets).backward()
        if world_size > 1:
            dist.barrier()  # every rank starts the step together
        step.wrap(optimizer.step)()
    return {
        "update_cpu": sum(update.cpu) / steps,
        "update_wall": sum(update.wall) / steps,
        "all_gather_wall": sum(gather.wall) / steps,
        "communication_wall": sum(communication.wall) / steps,
        "step_wall": sum(step.wall) / steps,
        "state_bytes": optimizer_state_bytes(optimizer),
    }


def _worker(rank: int, world_size: int, init_file: str, out: str, names, warmup, steps) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        results = {name: measure(name, rank, world_size, warmup, steps) for name in names}
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def run(world_size: int, names: list[str], warmup: int, steps: int) -> list[dict]:
    """Each rank's figures per optimizer."""
    if world_size == 1:
        torch.set_num_threads(1)
        return [{name: measure(name, 0, 1, warmup, steps) for name in names}]
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(
            _worker,
            args=(world_size, f"{directory}/init", directory, names, warmup, steps),
            nprocs=world_size,
            join=True,
        )
        return [torch.load(f"{directory}/rank{r}.pt") for r in range(world_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--warmup", type=int, default=FREQUENCY)
    parser.add_argument("--steps", type=int, default=2 * FREQUENCY)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {n: run(n, args.optimizers, args.warmup, args.steps) for n in args.ranks}
    print(machine_description())
    print(
        "\n| optimizer | ranks | preconditioner CPU time (slowest rank) | vs 1 rank | state "
        "(largest rank) | vs 1 rank | all-gather share of step | collectives share of step "
        "| step wall time | vs 1 rank |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.optimizers:
        base = results[args.ranks[0]][0][name]
        for world_size in args.ranks:
            per_rank = [rank_results[name] for rank_results in results[world_size]]
            cpu = max(r["update_cpu"] for r in per_rank)
            state = max(r["state_bytes"] for r in per_rank)
            step = statistics.mean(r["step_wall"] for r in per_rank)
            share = statistics.mean(r["communication_wall"] / r["step_wall"] for r in per_rank)
            gathered = statistics.mean(r["all_gather_wall"] / r["step_wall"] for r in per_rank)
            print(
                f"| {name} | {world_size} | {1e3 * cpu:.1f} ms | {cpu / base['update_cpu']:.2f} | "
                f"{state / 2**20:.2f} MiB | {state / base['state_bytes']:.2f} | "
                f"{100 * gathered:.0f}% | {100 * share:.0f}% | {1e3 * step:.1f} ms | "
                f"{step / base['step_wall']:.2f} |"
            )


if __name__ == "__main__":
    main()
