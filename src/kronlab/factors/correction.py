"""Eigenvalue correction: second moments measured in a Kronecker factor's eigenbasis.

* Full correction (EShampoo, George et al. 2018; SOAP, Vyas et al. 2024): one second moment per
  eigenbasis coordinate, ``E ← β E + (1 − β) (Qᵀ G)^{⊙2}`` (m·n entries for an m×n block).
* Per-factor correction: one eigenvalue per factor direction, ``E_k ← β E_k + (1 − β)
  diag(Q_kᵀ O_t Q_k)`` with ``O_t`` this step's outer product along axis k (m + n entries).

When an eigenbasis is refreshed the estimates are carried over, never recomputed, in one of two
ways: each entry follows its eigenvector column (``follow_columns``: what SOAP does with the sort
order of its QR refresh), or the diagonal estimate is re-expressed in the new basis, ``P E`` with
``P = (Q_newᵀ Q_old)^{⊙2}`` (``transport_*``: doubly stochastic, exact for permutations and sign
flips, mixing entries under a rotation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kronlab.factors.accumulation import accumulate_, accumulate_square_
from kronlab.factors.kronecker import kronecker_product_apply
from kronlab.linalg.qr import rayleigh_quotients


def basis_overlap(new_eigenvectors: torch.Tensor, old_eigenvectors: torch.Tensor) -> torch.Tensor:
    """``(Q_newᵀ Q_old)^{⊙2}``: row i says how old directions make up new direction i."""
    return (new_eigenvectors.transpose(-1, -2) @ old_eigenvectors).square()


def transport_second_moment(
    second_moment: torch.Tensor,
    new_eigenvectors: Sequence[torch.Tensor],
    old_eigenvectors: Sequence[torch.Tensor],
) -> torch.Tensor:
    """A full eigenbasis second moment ``(B, d_1, …, d_k)`` re-expressed in refreshed bases:
    ``E ×_1 P_1 ×_2 P_2 ⋯``."""
    overlaps = [basis_overlap(new, old) for new, old in zip(new_eigenvectors, old_eigenvectors)]
    return kronecker_product_apply(second_moment, overlaps)


def follow_columns(estimate: torch.Tensor, orders: Sequence[torch.Tensor]) -> torch.Tensor:
    """Reindex ``estimate`` ``(B, d_1, …)`` along each axis i by ``orders[i]`` ``(B, d_i)``:
    entry k of the new basis takes the value of old column ``orders[i][k]``."""
    for axis, order in enumerate(orders):
        shape = [order.shape[0]] + [1] * (estimate.ndim - 1)
        shape[axis + 1] = order.shape[-1]
        estimate = estimate.gather(axis + 1, order.reshape(shape).expand_as(estimate))
    return estimate


def update_factor_eigenvalues_(
    eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, outer_product: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-factor correction, in place: ``E ← β E + (1 − β) diag(Qᵀ O Q)``."""
    return accumulate_(eigenvalues, rayleigh_quotients(outer_product, eigenvectors), beta)


def update_second_moment_(
    second_moment: torch.Tensor, rotated_gradient: torch.Tensor, beta: float
) -> torch.Tensor:
    """Full correction, in place: ``E ← β E + (1 − β) G̃^{⊙2}`` with ``G̃ = G ×_i Q_iᵀ``."""
    return accumulate_square_(second_moment, rotated_gradient, beta)
