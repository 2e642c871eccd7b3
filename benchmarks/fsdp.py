"""FSDP2 (``fully_shard``) parameters: what the exact full-tensor step's exchange costs.

Run from the worktree root::

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m benchmarks.fsdp --ranks 2 3

N gloo CPU processes shard the 4-layer transformer of ``benchmarks.common`` with
``fully_shard`` and run one backward pass. With the bundles assigned as
``distributed=DistributedConfig()`` assigns them (SOAP's cost model), each rank times (wall,
median over ``--repeats``, all ranks starting together):

* ``all_to_all gather``: ``gather_to_owners``, one all-to-all per dtype that gives each owner the
  full values and gradients of its parameters (what the step uses);
* ``full_tensor gather``: the alternative, ``DTensor.full_tensor()`` of every value and gradient
  (one all-gather per tensor; every rank receives the whole model);
* ``all_to_all scatter``: ``scatter_from_owners``, the owners' new values back to the shards;
* ``FSDP2 step`` / ``DDP step``: a whole SOAP ``optimizer.step()`` on the FSDP2 model, and on the
  same model unsharded with ``distributed=DistributedConfig()`` (the DDP path: the owners'
  results all-gathered), so their difference is what the shards cost.

The slowest rank is reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

from benchmarks.common import (
    benchmark_transformer,
    language_model_loss,
    machine_description,
    transformer_batch,
)
from kronlab.distributed import DistributedConfig
from kronlab.optim import SOAP
from kronlab.optim.sharded_step import full_views

FREQUENCY = 5


def _timed(function: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``function`` (after one warm-up call), every rank starting
    together."""
    times = []
    for index in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        function()
        if index:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _backward(model: torch.nn.Module) -> None:
    inputs, targets = transformer_batch()
    model.zero_grad()
    language_model_loss(model(inputs), targets).backward()


def measure(repeats: int) -> dict[str, float]:
    model = fully_shard(benchmark_transformer())
    optimizer = SOAP(model.parameters(), lr=1e-3, precondition_frequency=FREQUENCY)
    _backward(model)
    sharding = optimizer.sharding()
    assert sharding is not None
    views = full_views(optimizer, sharding)
    assert views is not None

    def full_tensors() -> None:
        for param in views.params:
            param.full_tensor()
            param.grad.full_tensor()

    figures = {
        "all_to_all gather": _timed(views.gather, repeats),
        "full_tensor gather": _timed(full_tensors, repeats),
        "all_to_all scatter": _timed(lambda: views.scatter(None, None), repeats),
    }
    views.release()

    def steps(optimizer: SOAP, model: torch.nn.Module) -> float:
        times = []
        for index in range(FREQUENCY * (1 + repeats // FREQUENCY)):
            _backward(model)
            dist.barrier()
            start = time.perf_counter()
            optimizer.step()
            if index >= FREQUENCY:  # whole refresh periods after the first
                times.append(time.perf_counter() - start)
        return statistics.mean(times)

    figures["FSDP2 step"] = steps(optimizer, model)
    plain = benchmark_transformer()
    figures["DDP step"] = steps(
        SOAP(
            plain.parameters(),
            lr=1e-3,
            precondition_frequency=FREQUENCY,
            distributed=DistributedConfig(),
        ),
        plain,
    )
    figures["model MiB"] = sum(p.numel() * p.element_size() for p in plain.parameters()) / 2**20
    return figures


def _worker(rank: int, world_size: int, init_file: str, out: str, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        results = measure(repeats)
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def run(world_size: int, repeats: int) -> dict[str, float]:
    """The slowest rank's figures."""
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(
            _worker,
            args=(world_size, f"{directory}/init", directory, repeats),
            nprocs=world_size,
            join=True,
        )
        ranks = [torch.load(f"{directory}/rank{r}.pt") for r in range(world_size)]
    return {key: max(figures[key] for figures in ranks) for key in ranks[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(machine_description())
    for world_size in args.ranks:
        figures = run(world_size, args.repeats)
        print(f"\n{world_size} ranks (model {figures.pop('model MiB'):.1f} MiB, slowest rank):")
        for key, seconds in figures.items():
            print(f"  {key:20s} {1000 * seconds:8.1f} ms")


if __name__ == "__main__":
    main()
