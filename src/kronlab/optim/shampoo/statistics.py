"""Kronecker factor statistics of a stack of blocks, plain or KL-Shampoo's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kronlab.factors.accumulation import accumulate_
from kronlab.factors.kronecker import axis_outer_products, kronecker_product_apply


def outer_products(
    gradient: torch.Tensor, kl_inverse_sqrts: Sequence[torch.Tensor | None] | None
) -> list[torch.Tensor]:
    """This step's outer product per axis: ``G_(i) G_(i)ᵀ`` (Shampoo), or with KL-Shampoo
    (Lin et al., 2025) ``X_(i) X_(i)ᵀ / c_i`` with ``X = G ×_{j≠i} F_j^{-1/2}`` and
    ``c_i = numel/d_i`` — for a matrix ``G R^{-1} Gᵀ / n`` and ``Gᵀ L^{-1} G / m``.

    ``kl_inverse_sqrts=None`` is plain Shampoo; a ``None`` entry skips that factor (identity).
    """
    if kl_inverse_sqrts is None:
        return axis_outer_products(gradient)
    numel = gradient[0].numel()
    products = []
    for axis in range(gradient.ndim - 1):
        others = [None if j == axis else root for j, root in enumerate(kl_inverse_sqrts)]
        transformed = kronecker_product_apply(gradient, others)
        unfolded = transformed.movedim(axis + 1, 1).reshape(
            gradient.shape[0], gradient.shape[axis + 1], -1
        )
        other_size = numel // gradient.shape[axis + 1]
        products.append((unfolded @ unfolded.transpose(-1, -2)) / other_size)
    return products


def update_factors_(state: dict[str, Any], products: Sequence[torch.Tensor], beta: float) -> None:
    """``F_i ← β F_i + (1 − β) O_i`` for every axis (zero-initialised; ``β = 1`` sums)."""
    if "factors" not in state:
        state["factors"] = [torch.zeros_like(product) for product in products]
    for factor, product in zip(state["factors"], products):
        accumulate_(factor, product, beta)
