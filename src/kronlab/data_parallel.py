"""Data-parallel training runs under ``torchrun`` (``kronlab compare``, ``kronlab bench``).

``torchrun --nproc-per-node N`` starts N copies of the command. Each joins the process group
(gloo: these commands train on the CPU), wraps the model in ``DistributedDataParallel``, takes
its share of every global batch (contiguous rows, shares differing by at most one row) and
splits the preconditioner work of kronlab optimizers over the ranks
(``distributed=DistributedConfig()``, the exact mode). Each rank's mean loss is weighted by its
share of the rows before the backward pass, so DDP's average over the ranks is the gradient of
the global batch's mean loss: the run takes one process's steps on the same batches, to float
rounding. Only rank 0 prints and writes files. Without torchrun everything is one rank and
nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kronlab.distributed import DistributedConfig
from kronlab.distributed.workers import Workers, init_workers
from kronlab.optim.base import KronOptimizer


@contextmanager
def launched() -> Iterator[Workers]:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1), or run alone; leave it
    at the end."""
    joined = dist.is_available() and not dist.is_initialized()
    workers = init_workers(backend="gloo", device="cpu")
    try:
        yield workers
    finally:
        if joined and workers.distributed:
            dist.destroy_process_group()


def current_workers() -> Workers:
    """This process's rank among the ranks of the default process group (one rank without)."""
    if not dist.is_available() or not dist.is_initialized():
        return Workers()
    return Workers(dist.get_rank(), dist.get_world_size())


def wrap_model(model: nn.Module, workers: Workers) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` over several ranks, else itself."""
    return DistributedDataParallel(model) if workers.distributed else model


def distribute_optimizer(optimizer: Any, workers: Workers) -> None:
    """Split a kronlab optimizer's preconditioner work over the ranks (before its first step);
    other optimizers are left as they are (every rank then repeats their work)."""
    if workers.distributed and isinstance(optimizer, KronOptimizer):
        optimizer.distribute(DistributedConfig())


def local_share(batch: Any, workers: Workers) -> tuple[Any, float]:
    """This rank's rows of a global ``batch`` (a tensor or a tuple/list of tensors with the
    examples along dim 0) and the weight of its mean loss: ``rows here · N / rows``, so that
    DDP's average of the weighted gradients is the gradient of the global mean loss."""
    if not workers.distributed:
        return batch, 1.0
    tensors = list(batch) if isinstance(batch, (tuple, list)) else [batch]
    rows = tensors[0].shape[0]
    if rows < workers.world_size:
        raise ValueError(
            f"Invalid batch size: {rows} rows for {workers.world_size} processes (allowed: at "
            "least one row per process)"
        )
    shares = [torch.tensor_split(tensor, workers.world_size)[workers.rank] for tensor in tensors]
    weight = shares[0].shape[0] * workers.world_size / rows
    local = type(batch)(shares) if isinstance(batch, (tuple, list)) else shares[0]
    return local, weight


def global_mean(value: float, weight: float, workers: Workers) -> float:
    """The global batch's mean loss from each rank's mean ``value`` on its share (``weight``
    from ``local_share``); one all-reduce, the same number on every rank."""
    if not workers.distributed:
        return value
    total = torch.tensor([value * weight / workers.world_size], dtype=torch.float64)
    return float(workers.all_reduce_sum(total).item())


def agree_with_main(value: Any, workers: Workers) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not workers.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
