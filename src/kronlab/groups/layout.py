"""The shape a preconditioner sees: size-1 dims dropped, small dims merged, large dims blocked.

Shared by every optimizer, so blocking by ``max_preconditioner_dim`` (Distributed Shampoo,
Shi et al., 2023) and most-square reshaping (PSGD, Li 2018) behave the same everywhere.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch


def drop_unit_dims(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without its size-1 dims (a scalar or all-ones shape becomes ``()``)."""
    return tuple(size for size in shape if size != 1)


def merge_small_dims(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """Merge adjacent dims, left to right, while their product stays ``<= max_dim``."""
    merged: list[int] = []
    for size in shape:
        if merged and merged[-1] * size <= max_dim:
            merged[-1] *= size
        else:
            merged.append(size)
    return tuple(merged)


def most_square_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Split dims (in order) into two products minimizing ``max/min``; <=2 dims unchanged.

    Example: ``(32, 64, 1024) → (2048, 1024)``.
    """
    if len(shape) <= 2:
        return tuple(shape)
    candidates = [(math.prod(shape[:cut]), math.prod(shape[cut:])) for cut in range(1, len(shape))]
    return min(candidates, key=lambda pair: max(pair) / min(pair))


@dataclass(frozen=True)
class BlockLayout:
    """A tensor of ``original_shape`` viewed as ``shape`` and cut into blocks.

    ``splits[d]`` lists the block sizes along dim ``d``; blocks are ordered with the first dim
    outermost. ``split`` returns views; ``merge`` is its inverse.
    """

    original_shape: tuple[int, ...]
    shape: tuple[int, ...]
    splits: tuple[tuple[int, ...], ...]

    @property
    def block_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(sizes) for sizes in itertools.product(*self.splits)]

    @property
    def num_blocks(self) -> int:
        return math.prod([len(sizes) for sizes in self.splits])  # a list: Dynamo traces it

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        blocks = [tensor.reshape(self.shape)]
        for dim, sizes in enumerate(self.splits):
            if len(sizes) > 1:
                blocks = [piece for block in blocks for piece in block.split(sizes, dim=dim)]
        return blocks

    def merge(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        for dim in reversed(range(len(self.splits))):
            count = len(self.splits[dim])
            if count > 1:
                blocks = [
                    torch.cat(blocks[start : start + count], dim=dim)
                    for start in range(0, len(blocks), count)
                ]
        (whole,) = blocks
        return whole.reshape(self.original_shape)


def plan_layout(
    shape: tuple[int, ...] | torch.Size,
    max_preconditioner_dim: int | None = None,
    *,
    merge_dims: bool = True,
    most_square: bool = False,
) -> BlockLayout:
    """Plan how a tensor of ``shape`` is preconditioned.

    Size-1 dims are dropped; with ``most_square`` a >2-D shape becomes its most-square matrix;
    with ``merge_dims`` adjacent dims merge while the product is ``<= max_preconditioner_dim``;
    then every dim larger than ``max_preconditioner_dim`` is cut into blocks of that size (the
    last one smaller). ``None`` means no limit: no merging and no blocking.
    """
    if max_preconditioner_dim is not None and max_preconditioner_dim < 1:
        raise ValueError(
            f"max_preconditioner_dim must be >= 1 or None, got {max_preconditioner_dim}"
        )
    original = tuple(int(size) for size in shape)
    view = drop_unit_dims(original)
    if most_square:
        view = most_square_shape(view)
    if max_preconditioner_dim is None:
        return BlockLayout(original, view, tuple((size,) for size in view))
    if merge_dims:
        view = merge_small_dims(view, max_preconditioner_dim)
    splits = tuple(_chunk_sizes(size, max_preconditioner_dim) for size in view)
    return BlockLayout(original, view, splits)


def _chunk_sizes(size: int, chunk: int) -> tuple[int, ...]:
    full, remainder = divmod(size, chunk)
    return (chunk,) * full + ((remainder,) if remainder else ())
