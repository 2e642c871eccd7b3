"""Damped inverse roots of Kronecker factors from their eigendecomposition.

Shampoo's preconditioner per factor is ``(F / bc + ε I)^{-p}`` (Gupta et al., 2018), with ``p =
1/(2k)`` for a k-factor block: the ``"per_factor_absolute"`` rule of
:class:`kronlab.factors.Damping` through ``eigenbasis_matrix`` (``Q f(Λ) Qᵀ``), kept as stack
kernels for the optimizers' cached roots.
"""

from __future__ import annotations

import torch

from kronlab.factors.damping import Damping, factor_eigenvalue_powers
from kronlab.factors.eigenbasis import eigenbasis_matrix
from kronlab.linalg.symmetric import symmetric_product


def damped_inverse_root_scales(
    eigenvalues: torch.Tensor, epsilon: float, exponent: float, scale: float = 1.0
) -> torch.Tensor:
    """``(scale · λ + ε)^{-exponent}``, with negative round-off eigenvalues clamped to 0."""
    damping = Damping("per_factor_absolute", epsilon)
    return factor_eigenvalue_powers(eigenvalues, -exponent, damping, scale)


def damped_inverse_root(
    eigenvalues: torch.Tensor,
    eigenvectors: torch.Tensor,
    epsilon: float,
    exponent: float,
    scale: float = 1.0,
) -> torch.Tensor:
    """``Q diag((scale · λ + ε)^{-exponent}) Qᵀ`` for a stack ``(B, d)``, ``(B, d, d)``."""
    scales = damped_inverse_root_scales(eigenvalues, epsilon, exponent, scale)
    return eigenbasis_matrix(eigenvectors, scales)


def damped_inverse_root_(
    eigenvalues: torch.Tensor,
    eigenvectors: torch.Tensor,
    epsilon: float,
    exponent: float,
    scale: float = 1.0,
) -> torch.Tensor:
    """``damped_inverse_root`` as ``X Xᵀ`` with ``X = Q diag(s^{1/2})`` formed in place in
    ``eigenvectors`` (overwritten: for callers that keep no eigenvectors). No ``d×d``
    temporary, positive semi-definite by construction, and for stacks the product is formed
    from its top rows and bottom-right block only (``symmetric_product``: ¾ of the work)."""
    half_scales = damped_inverse_root_scales(eigenvalues, epsilon, exponent / 2, scale)
    factor = eigenvectors.mul_(half_scales.unsqueeze(-2))
    if factor.ndim == 3:
        return symmetric_product(factor, factor.transpose(-1, -2))
    return factor @ factor.transpose(-1, -2)
