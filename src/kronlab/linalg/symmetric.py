"""Products of stacked matrices that are known to be symmetric, in about ¾ of the work."""

from __future__ import annotations

import torch
from torch import Tensor

SPLIT_MIN_SIZE = 256  # below this the halves' GEMMs lose more efficiency than the split saves


def symmetric_product(
    left: Tensor, right: Tensor, *, symmetrize: bool = False, min_split: int = SPLIT_MIN_SIZE
) -> Tensor:
    """``left @ right`` for a stack ``(B, d, k) @ (B, k, d)`` whose products are symmetric.

    For products that are symmetric in exact arithmetic (``X Xᵀ``; ``Q Q`` and ``E Q E`` of
    symmetric ``Q``, ``E``). With the rows and columns split in halves,
    ``left @ right = [[A, C], [Cᵀ, D]]``: only the top rows ``[A C]`` and the block ``D`` are
    multiplied (¾ of the multiply-adds) and ``Cᵀ`` is copied. ``symmetrize=True`` also replaces
    the diagonal blocks by ``(A + Aᵀ)/2`` and ``(D + Dᵀ)/2``, so the result is exactly
    symmetric whatever the rounding, like ``(P + Pᵀ)/2`` of the full product ``P`` (equal to it
    up to rounding). Stacks with ``d < min_split`` are multiplied whole.
    """
    if left.ndim != 3 or right.ndim != 3 or left.shape[-1] != right.shape[-2]:
        raise ValueError(
            f"expected stacks (B, d, k) and (B, k, d), got {tuple(left.shape)} and "
            f"{tuple(right.shape)}"
        )
    size = left.shape[-2]
    if right.shape[-1] != size:
        raise ValueError(f"the product must be square, got {size} x {right.shape[-1]}")
    if size < min_split:
        product = left @ right
        return product.mT.add(product).mul_(0.5) if symmetrize else product
    half = size // 2
    if torch.compiler.is_compiling():
        return _joined_halves(left, right, half, symmetrize)
    result = left.new_empty((left.shape[0], size, size))
    torch.bmm(left.narrow(-2, 0, half), right, out=result[:, :half])
    torch.bmm(
        left.narrow(-2, half, size - half),
        right.narrow(-1, half, size - half),
        out=result[:, half:, half:],
    )
    result[:, half:, :half] = result[:, :half, half:].mT
    if symmetrize:
        for block in (result[:, :half, :half], result[:, half:, half:]):
            # a contiguous transposed copy, then in place: faster than a strided-operand add
            block.add_(block.mT.contiguous()).mul_(0.5)
    return result


def _joined_halves(left: Tensor, right: Tensor, half: int, symmetrize: bool) -> Tensor:
    """``symmetric_product``'s blocks, the same operations, joined by ``cat``: a traced step
    (torch.compile) cannot write a product into a strided view (``out=``)."""
    size = left.shape[-2]
    top = torch.bmm(left.narrow(-2, 0, half), right)  # [A C]
    corner = torch.bmm(left.narrow(-2, half, size - half), right.narrow(-1, half, size - half))
    first, shared = top.narrow(-1, 0, half), top.narrow(-1, half, size - half)
    if symmetrize:
        first = first.add(first.mT).mul_(0.5)
        corner = corner.add(corner.mT).mul_(0.5)
    return torch.cat([torch.cat([first, shared], -1), torch.cat([shared.mT, corner], -1)], -2)
