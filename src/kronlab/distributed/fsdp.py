"""Moving FSDP2-sharded parameters between the ranks that hold their shards and the rank that
preconditions them.

``torch.distributed.fsdp.fully_shard`` keeps each parameter as a DTensor sharded along one
dimension over a 1-D device mesh: rank ``r`` holds chunk ``r`` of
``torch.chunk(full, world_size, dim)`` (possibly empty), and after the backward pass its gradient
is sharded the same way. A Kronecker preconditioner needs the whole block, so the owner of a
parameter's bundle assembles it, steps it, and sends each rank its part of the result. Both
moves are one ``all_to_all`` per buffer dtype, so that every rank sends and receives only what it
holds or needs (an all-gather would give every rank the whole model):

* ``gather_to_owners``: each rank sends each owner its shards of the owner's parameters (value,
  gradient and whether it has one); the owner writes the full values and gradients.
* ``scatter_from_owners``: each owner sends each rank that rank's part of its full tensors (new
  values, or changes to add in a narrower communication dtype); each rank writes its shards.

Every rank calls both with the same parameters in the same order, whatever its gradients held,
so the split sizes agree and no rank waits for a call another rank skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

LAYOUT_ALLOWED = (
    "DTensors sharded along one dimension over a 1-D mesh of the process group's ranks, as "
    "torch.distributed.fsdp.fully_shard makes them"
)


@dataclass(frozen=True)
class ShardLayout:
    """Where each rank's shard lies in the full tensor: ``sizes[r]`` entries along ``dim``
    from ``offsets[r]``."""

    shape: torch.Size
    dim: int
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]

    def piece(self, full: Tensor, rank: int) -> Tensor:
        """Rank ``rank``'s shard of ``full`` (a view)."""
        return full.narrow(self.dim, self.offsets[rank], self.sizes[rank])

    def numel(self, rank: int) -> int:
        """Entries of rank ``rank``'s shard."""
        if not self.sizes[rank]:
            return 0
        return self.shape.numel() // self.shape[self.dim] * self.sizes[rank]


def shard_layout(param: DTensor, group: dist.ProcessGroup | None) -> ShardLayout | None:
    """The layout of ``param`` over ``group``; ``None`` if it is not a layout this module moves
    (several mesh dimensions, a placement other than ``Shard``, a mesh of other ranks)."""
    mesh = param.device_mesh
    placements = param.placements
    if param.ndim == 0 or mesh.ndim != 1 or len(placements) != 1:
        return None
    if type(placements[0]) is not Shard:  # not a subclass either (e.g. a strided shard)
        return None
    if dist.get_process_group_ranks(mesh.get_group()) != dist.get_process_group_ranks(
        group if group is not None else dist.group.WORLD
    ):
        return None
    world_size = mesh.size()
    dim = placements[0].dim % param.ndim
    pieces = [
        Shard.local_shard_size_and_offset(param.shape[dim], world_size, r)
        for r in range(world_size)
    ]
    return ShardLayout(param.shape, dim, tuple(s for s, _ in pieces), tuple(o for _, o in pieces))


def local_shard(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor``: its local shard for a DTensor, else ``tensor``."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()  # writes parameters and their stand-ins in place
def gather_to_owners(
    params: Sequence[DTensor],
    layouts: Sequence[ShardLayout],
    owners: Sequence[int],
    full: Sequence[Tensor | None],
    rank: int,
    world_size: int,
    group: dist.ProcessGroup | None,
) -> list[Tensor | None]:
    """Write the full value of every parameter this rank owns into ``full[i]`` (a plain tensor
    of the full shape; ``None`` for the parameters of other owners) and return its full
    gradient (``None`` where no rank had one, and for the parameters of other owners).

    A rank without a gradient for a parameter sends zeros in its place, flagged as missing.
    """
    gradients: list[Tensor | None] = [None] * len(params)
    for indices in _by_dtype(params, None).values():
        counts = [[0] * world_size, [0] * world_size]  # [sent to owner o, received from rank r]
        for i in indices:
            counts[0][owners[i]] += 2 * layouts[i].numel(rank) + 1
            if owners[i] == rank:
                for source in range(world_size):
                    counts[1][source] += 2 * layouts[i].numel(source) + 1
        # sent in owner order, each owner's parameters in parameter order
        pieces = []
        for owner in range(world_size):
            for i in indices:
                if owners[i] != owner:
                    continue
                value = params[i].to_local()
                gradient = params[i].grad
                has = torch.ones(1, dtype=value.dtype, device=value.device)
                if gradient is None:
                    gradient, has = torch.zeros_like(value), has.zero_()
                gradient = local_shard(gradient).to(value.dtype)
                if gradient.shape != value.shape:  # e.g. a replicated gradient of a shard
                    raise TypeError(
                        f"Invalid gradient: local shape {tuple(gradient.shape)} of a parameter "
                        f"whose local shard is {tuple(value.shape)} (allowed: a gradient "
                        "sharded as its parameter, as fully_shard's backward leaves it)"
                    )
                pieces += [value.reshape(-1), gradient.reshape(-1), has]
        first = params[indices[0]].to_local()
        send = torch.cat(pieces) if pieces else first.new_empty(0)
        received = first.new_empty(sum(counts[1]))
        dist.all_to_all_single(received, send, counts[1], counts[0], group=group)
        mine = [i for i in indices if owners[i] == rank]
        grads = {i: torch.empty_like(full[i]) for i in mine}  # type: ignore[arg-type]
        flag_positions: dict[int, list[int]] = {i: [] for i in mine}
        offset = 0
        for source in range(world_size):
            for i in mine:
                layout, count = layouts[i], layouts[i].numel(source)
                for target in (full[i], grads[i]):
                    piece = layout.piece(target, source)  # type: ignore[arg-type]
                    piece.copy_(received[offset : offset + count].view(piece.shape))
                    offset += count
                flag_positions[i].append(offset)
                offset += 1
        # one read of all the flags (a single host sync on an accelerator)
        flags = received[[p for i in mine for p in flag_positions[i]]].tolist() if mine else []
        for position, i in enumerate(mine):
            present = any(flags[position * world_size : (position + 1) * world_size])
            gradients[i] = grads[i] if present else None
    return gradients


@torch.no_grad()
def scatter_from_owners(
    params: Sequence[DTensor],
    layouts: Sequence[ShardLayout],
    owners: Sequence[int],
    full: Sequence[Tensor | None],
    rank: int,
    world_size: int,
    group: dist.ProcessGroup | None,
    *,
    dtype: torch.dtype | None = None,
    add: bool = False,
) -> None:
    """Every rank writes into its shard of each parameter the matching part of the owner's
    ``full[i]`` (``None`` on other ranks): copies it, or adds it (``add``). ``dtype``: the
    buffer dtype (each parameter's own when ``None``); the owner's part goes through the same
    rounding, so every rank writes the same values."""
    for indices in _by_dtype(params, dtype).values():
        counts = [[0] * world_size, [0] * world_size]  # [sent to rank r, received from owner o]
        for i in indices:
            counts[1][owners[i]] += layouts[i].numel(rank)
            if owners[i] == rank:
                for target in range(world_size):
                    counts[0][target] += layouts[i].numel(target)
        buffer_dtype = dtype or params[indices[0]].dtype
        pieces = [
            layouts[i].piece(full[i], target).reshape(-1).to(buffer_dtype)  # type: ignore[arg-type]
            for target in range(world_size)
            for i in indices
            if owners[i] == rank
        ]
        first = params[indices[0]].to_local()
        send = torch.cat(pieces) if pieces else first.new_empty(0, dtype=buffer_dtype)
        received = first.new_empty(sum(counts[1]), dtype=buffer_dtype)
        dist.all_to_all_single(received, send, counts[1], counts[0], group=group)
        offset = 0
        for owner in range(world_size):
            for i in indices:
                if owners[i] != owner:
                    continue
                shard = params[i].to_local()
                count = shard.numel()
                chunk = received[offset : offset + count].view(shard.shape)
                offset += count
                if add:
                    shard.add_(chunk)
                else:
                    shard.copy_(chunk)


def _by_dtype(params: Sequence[Tensor], dtype: torch.dtype | None) -> dict[torch.dtype, list[int]]:
    """Parameter positions per buffer dtype, in order of first appearance (the same on every
    rank)."""
    groups: dict[torch.dtype, list[int]] = {}
    for index, param in enumerate(params):
        groups.setdefault(dtype or param.dtype, []).append(index)
    return groups


__all__ = [
    "LAYOUT_ALLOWED",
    "ShardLayout",
    "gather_to_owners",
    "local_shard",
    "scatter_from_owners",
    "shard_layout",
]
