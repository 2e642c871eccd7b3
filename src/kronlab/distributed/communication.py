"""The collectives of a sharded step: agree on the outcome, then all-gather the owners' results.

Every rank calls the same collectives in the same order with buffers of the same size, whatever
its gradients held (a rank without a gradient for some parameter still sends its share and
receives the others'), so no rank waits for a call another rank skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# Outcomes of a step on one rank; the all-reduce keeps the worst.
STEP_OK = 0
STEP_NON_FINITE = 1
STEP_FAILED = 2


def agree_on_outcome(outcome: int, device: torch.device, group: dist.ProcessGroup | None) -> int:
    """The worst outcome over all ranks (``STEP_OK`` < ``STEP_NON_FINITE`` < ``STEP_FAILED``):
    one all-reduce of one integer, so all ranks commit or skip a step together."""
    flag = torch.tensor([outcome], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())


def all_reduce_max(
    values: Sequence[float], device: torch.device, group: dist.ProcessGroup | None
) -> list[float]:
    """The elementwise maximum of ``values`` over all ranks (one all-reduce, float64)."""
    buffer = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=group)
    return buffer.tolist()


def all_gather_owned(
    items: Sequence[Sequence[Tensor]],
    owners: Sequence[int],
    rank: int,
    world_size: int,
    group: dist.ProcessGroup | None,
    dtype: torch.dtype | None = None,
) -> None:
    """Overwrite every item's tensors with its owner's, in place, on every rank.

    ``items[i]`` (the same shapes on every rank) belongs to rank ``owners[i]``. Each rank packs
    its items into one flat buffer per dtype (``dtype``, or each tensor's own when ``None``),
    padded to the longest rank's, and one ``all_gather`` per dtype exchanges them. When the
    buffer dtype rounds (``dtype`` narrower than a tensor's), the owner's tensors are rounded as
    well, so every rank ends with the same values.
    """
    # in order of first appearance (not a set's order): the same on every rank
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, tensors in enumerate(items):
        for buffer_dtype in dict.fromkeys(dtype or tensor.dtype for tensor in tensors):
            by_dtype.setdefault(buffer_dtype, []).append(index)
    for buffer_dtype, indices in by_dtype.items():
        _gather_one_dtype(items, indices, owners, rank, world_size, group, buffer_dtype, dtype)


def _gather_one_dtype(
    items: Sequence[Sequence[Tensor]],
    indices: Sequence[int],
    owners: Sequence[int],
    rank: int,
    world_size: int,
    group: dist.ProcessGroup | None,
    buffer_dtype: torch.dtype,
    forced: torch.dtype | None,
) -> None:
    def travels(tensor: Tensor) -> bool:
        return (forced or tensor.dtype) == buffer_dtype

    sizes = [0] * world_size
    for index in indices:
        sizes[owners[index]] += sum(t.numel() for t in items[index] if travels(t))
    length = max(sizes)
    if length == 0:
        return
    device = next(t.device for t in items[indices[0]] if travels(t))
    own = [
        t.reshape(-1)
        for index in indices
        if owners[index] == rank
        for t in items[index]
        if travels(t)
    ]
    send = torch.zeros(length, dtype=buffer_dtype, device=device)
    if own:
        send[: sizes[rank]] = torch.cat([t.to(buffer_dtype) for t in own])
    received = [torch.empty_like(send) for _ in range(world_size)]
    dist.all_gather(received, send, group=group)
    offsets = [0] * world_size
    for index in indices:
        owner = owners[index]
        for tensor in items[index]:
            if not travels(tensor):
                continue
            count = tensor.numel()
            chunk = received[owner][offsets[owner] : offsets[owner] + count]
            offsets[owner] += count
            if owner == rank and tensor.dtype == buffer_dtype:
                continue  # the owner's own values, unrounded: nothing to write
            tensor.copy_(chunk.view(tensor.shape))
