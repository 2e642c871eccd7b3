"""Kronecker factor statistics of a stack of blocks, plain or KL-Shampoo's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kronlab.factors.accumulation import accumulate_, accumulate_gram_
from kronlab.factors.kronecker import kronecker_product_apply, unfold


def update_factors_(
    state: dict[str, Any],
    gradient: torch.Tensor,
    kl_inverse_sqrts: Sequence[torch.Tensor | None] | None,
    beta: float,
    *,
    keep_products: bool = False,
) -> list[torch.Tensor] | None:
    """``F_i ← β F_i + (1 − β) O_i`` for every axis (zero-initialised; ``β = 1`` sums), with
    this step's outer product ``O_i = G_(i) G_(i)ᵀ`` (Shampoo), or with KL-Shampoo (Lin et al.,
    2025) ``O_i = X_(i) X_(i)ᵀ / c_i``, ``X = G ×_{j≠i} F_j^{-1/2}`` and ``c_i = numel/d_i`` —
    for a matrix ``G R^{-1} Gᵀ / n`` and ``Gᵀ L^{-1} G / m``.

    ``kl_inverse_sqrts=None`` is plain Shampoo; a ``None`` entry skips that factor (identity).
    Without ``keep_products`` the update is ``accumulate_gram_`` per axis (the product is scaled
    and added by the GEMM itself, only its lower half multiplied for large factors) and
    ``None`` is returned; with it, the ``O_i`` are formed and returned (the per-factor
    correction reads them).
    """
    if "factors" not in state:
        state["factors"] = [
            gradient.new_zeros(gradient.shape[0], size, size) for size in gradient.shape[1:]
        ]
    products = []
    for axis, factor in enumerate(state["factors"]):
        transformed, other_size = gradient, 1
        if kl_inverse_sqrts is not None:
            others = [None if j == axis else root for j, root in enumerate(kl_inverse_sqrts)]
            transformed = kronecker_product_apply(gradient, others)
            other_size = gradient[0].numel() // gradient.shape[axis + 1]
        unfolded = unfold(transformed, axis)
        if keep_products:
            products.append((unfolded @ unfolded.transpose(-1, -2)) / other_size)
            accumulate_(factor, products[-1], beta)
        else:
            weight = 1.0 if beta == 1.0 else 1.0 - beta
            accumulate_gram_(factor, unfolded, beta, weight / other_size)
    return products if keep_products else None
