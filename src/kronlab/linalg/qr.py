"""Warm-started eigenbasis refresh: one (or a few) power-iteration steps with QR."""

from __future__ import annotations

from typing import NamedTuple

import torch

from kronlab.linalg._dtypes import check_square, working_dtype


class EigenbasisRefresh(NamedTuple):
    """Refreshed eigenvector estimates, descending by Rayleigh quotient.

    ``order`` is the permutation applied to the warm-start columns before the last QR step, so
    per-column state (e.g. SOAP's second moment) can be carried along with ``state[..., order]``.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    order: torch.Tensor


def rayleigh_quotients(matrix: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``diag(Qᵀ A Q)`` without forming the full product."""
    return ((matrix @ basis) * basis).sum(dim=-2)


def qr_eigenbasis_refresh(
    matrix: torch.Tensor, eigenvectors: torch.Tensor, iterations: int = 1
) -> EigenbasisRefresh:
    """Improve eigenvector estimates ``Q`` of symmetric ``A`` by warm-started subspace iteration.

    Each iteration sorts the columns of ``Q`` by descending Rayleigh quotient ``diag(QᵀAQ)`` and
    replaces ``Q`` with the orthonormal factor of ``A Q`` (signs fixed so ``diag(R) ≥ 0``, making an
    exact eigenbasis of a PSD matrix a fixed point). This is the eigenbasis update of SOAP
    (Vyas et al., 2024, "SOAP: Improving and Stabilizing Shampoo using Adam").
    """
    check_square("matrix", matrix)
    if eigenvectors.shape != matrix.shape:
        raise ValueError(
            f"eigenvectors must have the shape of matrix {tuple(matrix.shape)}, "
            f"got {tuple(eigenvectors.shape)}"
        )
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    dtype = working_dtype(matrix.dtype)
    matrix = matrix.to(dtype)
    basis = eigenvectors.to(dtype)
    total_order = torch.arange(matrix.shape[-1], device=matrix.device).expand(matrix.shape[:-1])
    for _ in range(iterations):
        order = rayleigh_quotients(matrix, basis).argsort(dim=-1, descending=True)
        basis = basis.gather(-1, order.unsqueeze(-2).expand_as(basis))
        total_order = total_order.gather(-1, order)
        q, r = torch.linalg.qr(matrix @ basis)
        signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        basis = q * torch.where(signs == 0, 1.0, signs).unsqueeze(-2)
    # QR keeps column k tied to input column k, so a final sort keeps ``order`` consistent.
    eigenvalues = rayleigh_quotients(matrix, basis)
    final = eigenvalues.argsort(dim=-1, descending=True)
    return EigenbasisRefresh(
        eigenvalues.gather(-1, final),
        basis.gather(-1, final.unsqueeze(-2).expand_as(basis)),
        total_order.gather(-1, final),
    )
