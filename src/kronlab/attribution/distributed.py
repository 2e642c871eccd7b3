"""Splitting the attribution pipeline across processes with ``torch.distributed``.

Under ``torchrun --nproc-per-node N`` every stage divides its work by chunk: chunk ``k`` belongs
to rank ``k mod N``, which alone computes and writes its rows (so the store is byte-identical to
a one-process build with the same chunking); curvature statistics are summed with
``all_reduce``; eigendecompositions are spread over ranks by module and broadcast. Gloo on CPU,
NCCL on GPU. Without a process group everything degenerates to one rank and no communication.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from kronlab.distributed.workers import Workers, init_workers


@runtime_checkable
class Reducer(Protocol):
    """How a curvature fit combines the processes that share its data: sums over ranks and a
    broadcast from one rank. :class:`Workers` is one (a single process: both are no-ops)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def broadcast_tensor(self, tensor: torch.Tensor, source: int) -> torch.Tensor: ...


__all__ = ["Reducer", "Workers", "init_workers"]
