"""The processes of a ``torchrun`` launch: this process's rank, the world size, its device.

Used by the attribution pipeline (work split by chunk) and by ``kronlab compare`` /
``kronlab bench`` (data-parallel runs). Without a process group everything is one rank and no
communication.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Workers:
    """This process's ``rank`` among ``world_size`` and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"rank must be in [0, world_size) with world_size >= 1, got rank={self.rank}, "
                f"world_size={self.world_size}"
            )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        return index % self.world_size == self.rank

    def owned(self, indices: Sequence[int]) -> list[int]:
        return [index for index in indices if self.owns(index)]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (moved through the backend's device) and return it."""
        if not self.distributed:
            return tensor
        staged = tensor.to(self._communication_device())
        dist.all_reduce(staged, op=dist.ReduceOp.SUM)
        tensor.copy_(staged.to(tensor.device))
        return tensor

    def broadcast_tensor(self, tensor: torch.Tensor, source: int) -> torch.Tensor:
        """``tensor`` as held by rank ``source``, on every rank (in place)."""
        if not self.distributed:
            return tensor
        staged = tensor.to(self._communication_device()).contiguous()
        dist.broadcast(staged, src=source)
        tensor.copy_(staged.to(tensor.device))
        return tensor

    def _communication_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def init_workers(backend: str | None = None, device: str | None = None) -> Workers:
    """Join the process group set up by ``torchrun`` (``WORLD_SIZE`` > 1), or run alone.

    ``backend`` defaults to NCCL when CUDA is available and gloo otherwise; each rank uses
    ``cuda:LOCAL_RANK`` with NCCL and the CPU with gloo unless ``device`` says otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_initialized() and world_size > 1:
        chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(chosen)
    if not dist.is_initialized():
        return Workers(device=torch.device(device or "cpu"))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if device is None:
        if dist.get_backend() == "nccl":
            local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        else:
            device = "cpu"
    return Workers(rank, world_size, torch.device(device))
