"""The cost model that assigns preconditioner work to ranks.

A block of shape ``(d_1, …, d_k)`` with Kronecker factors costs, per step, the factor
statistics and the preconditioning, each about ``numel · Σ d_i`` multiply-adds (a factor's
outer product ``G Gᵀ`` and a product with each factor), and every ``refresh_interval`` steps one
decomposition per factor, about ``d_i³``. Its state is the factors (and their eigenvectors or
roots, ``Σ d_i²`` each) plus a few tensors of the block's size. An elementwise block (a vector
stepped by Adam/AdamW) costs a few passes over its ``numel`` entries. Only ratios matter: the
assignment balances these numbers, it does not predict seconds.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

# Per-element passes of an elementwise (Adam-like) step, and of the block-sized tensors a
# Kronecker block keeps (momentum, grafting state, corrected eigenvalues).
ELEMENTWISE_PASSES = 10
BLOCK_SIZED_STATE = 3
# Two matrices per factor (the factor and its decomposition or root).
MATRICES_PER_FACTOR = 2


@dataclass(frozen=True)
class WorkItem:
    """One unit of work that a single rank owns: ``count`` blocks of ``block_shape``.

    ``factor_dims`` are the sizes of its Kronecker factors (empty for elementwise work);
    ``refresh_interval`` is the number of steps between decompositions.
    """

    key: Hashable
    block_shape: tuple[int, ...]
    factor_dims: tuple[int, ...] = ()
    count: int = 1
    refresh_interval: int = 1

    @property
    def numel(self) -> int:
        return self.count * math.prod(self.block_shape)

    def step_cost(self) -> float:
        """Multiply-adds per step excluding decompositions."""
        if not self.factor_dims:
            return float(ELEMENTWISE_PASSES * self.numel)
        return float(2 * self.numel * sum(self.factor_dims))

    def decomposition_cost(self) -> float:
        """Decomposition work per step (``Σ d³`` per block, amortized over the interval)."""
        cubes = sum(d**3 for d in self.factor_dims)
        return self.count * cubes / max(self.refresh_interval, 1)

    def state_elements(self) -> int:
        """Elements of optimizer state the owner keeps for this item."""
        if not self.factor_dims:
            return 2 * self.numel
        squares = sum(d * d for d in self.factor_dims)
        return self.count * MATRICES_PER_FACTOR * squares + BLOCK_SIZED_STATE * self.numel

    def cost(self, decomposition_weight: float = 1.0, memory_weight: float = 0.0) -> float:
        """The number the assignment balances."""
        return (
            self.step_cost()
            + decomposition_weight * self.decomposition_cost()
            + memory_weight * self.state_elements()
        )


@dataclass(frozen=True)
class OrthogonalizationItem(WorkItem):
    """A matrix ``(m, n)`` orthogonalized every step by ``iterations`` Newton–Schulz steps
    (Muon): each forms the ``k × k`` Gram matrix (``k = min(m, n)``) and multiplies it back,
    about ``2 · numel · k`` multiply-adds, plus its ``k³`` polynomial. No factors, no
    decomposition; its state is the momentum."""

    iterations: int = 5

    def step_cost(self) -> float:
        rows, cols = self.block_shape
        small = min(rows, cols)
        return float(self.count * self.iterations * (2 * rows * cols * small + small**3))

    def decomposition_cost(self) -> float:
        return 0.0

    def state_elements(self) -> int:
        return self.numel


def kronecker_item(
    key: Hashable,
    block_shape: Sequence[int],
    *,
    max_factor_dim: int | None = None,
    count: int = 1,
    refresh_interval: int = 1,
) -> WorkItem:
    """A block preconditioned by one factor per dimension; dimensions above
    ``max_factor_dim`` (or of size 1) get no factor. A block of fewer than two dimensions is
    elementwise work."""
    shape = tuple(int(d) for d in block_shape)
    if len(shape) < 2:
        return WorkItem(key, shape, (), count, refresh_interval)
    dims = tuple(d for d in shape if d > 1 and (max_factor_dim is None or d <= max_factor_dim))
    return WorkItem(key, shape, dims, count, refresh_interval)
