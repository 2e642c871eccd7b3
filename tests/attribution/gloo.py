"""Running a test function on several gloo processes on the CPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kronlab.attribution.distributed import Workers, init_workers


def run_on_ranks(
    function: Callable[..., None], world_size: int, directory: Path, *args: Any
) -> None:
    """``function(workers, *args)`` on ``world_size`` spawned processes joined by gloo
    (``function`` must be importable: a module-level function)."""
    mp.spawn(
        _rank,
        args=(world_size, str(directory / "init"), function, args),
        nprocs=world_size,
        join=True,
    )


def _rank(
    rank: int, world_size: int, init_file: str, function: Callable[..., None], args: tuple
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        workers: Workers = init_workers()
        assert (workers.rank, workers.world_size) == (rank, world_size)
        function(workers, *args)
    finally:
        dist.destroy_process_group()
