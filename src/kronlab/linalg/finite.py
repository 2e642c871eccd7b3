"""Fast finiteness checks: a sum first, an exact elementwise check only when it is not finite."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def finite_matrices(matrices: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """``(...)`` bool: whether every entry of each matrix of a stack ``(..., m, n)`` is finite
    (for a sequence of ``(B_i, m, n)`` stacks: of their concatenation, without forming it).

    A NaN or ±Inf entry makes its matrix's sum NaN or ±Inf, so a finite sum proves the matrix
    finite; only where a sum is not finite (a non-finite entry, or finite entries overflowing)
    is the exact ``isfinite`` pass run. A sum is one pass; ``isfinite`` makes three (``x == x``,
    ``abs``, ``!= inf``). One host sync.
    """
    if isinstance(matrices, torch.Tensor):
        finite = matrices.sum(dim=(-2, -1)).isfinite()
        if not bool(finite.all()):
            finite = torch.isfinite(matrices).flatten(-2).all(-1)
        return finite
    finite = torch.cat([stack.sum(dim=(-2, -1)) for stack in matrices]).isfinite()
    if not bool(finite.all()):
        finite = torch.cat([torch.isfinite(stack).flatten(-2).all(-1) for stack in matrices])
    return finite


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite (same sum-first test; one host sync)."""
    tensors = [tensor for tensor in tensors if tensor.numel()]
    if not tensors:
        return True
    if bool(torch.stack([tensor.sum().float() for tensor in tensors]).isfinite().all()):
        return True
    return bool(torch.stack([torch.isfinite(tensor).all() for tensor in tensors]).all())


def finite_flag(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor: whether every entry of every tensor is finite. No host sync.

    A finite sum proves its tensor finite, and a non-finite one (a NaN/Inf entry, or finite
    entries overflowing, which only makes the flag conservative) is all a masked step needs,
    so the sums alone decide, on the tensors' device.
    """
    tensors = [tensor for tensor in tensors if tensor.numel()]
    if not tensors:
        return torch.tensor(True)
    return torch.stack([tensor.sum().float() for tensor in tensors]).isfinite().all()
