"""Warm-started eigenbasis refresh: one (or a few) power-iteration steps with QR."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from kronlab.linalg._dtypes import check_square, working_dtype


class EigenbasisRefresh(NamedTuple):
    """Refreshed eigenvector estimates, descending by eigenvalue estimate.

    ``order`` is the permutation applied to the warm-start columns, so per-column state (e.g.
    SOAP's second moment) can be carried along with ``state[..., order]``.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    order: torch.Tensor


def rayleigh_quotients(matrix: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``diag(Qᵀ A Q)`` without forming the full product."""
    return _column_dots(matrix @ basis, basis)


def _column_dots(image: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``diag(Qᵀ (A Q))`` from ``A Q`` already formed: column-wise dot products."""
    return (image * basis).sum(dim=-2)


def _row_dots(rows: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two ``(…, d, d)`` stacks (``diag(X Yᵀ)``)."""
    return (rows * others).sum(dim=-1)


def _permute_rows(matrix: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``matrix[b, order[b], :]`` for every batch entry: whole-row copies by one index_select
    over the flattened stack (a gather would index every element)."""
    rows = matrix.shape[-2]
    flat = matrix.reshape(-1, matrix.shape[-1])
    offsets = torch.arange(0, flat.shape[0], rows, device=matrix.device).reshape(
        matrix.shape[:-2] + (1,)
    )
    return flat.index_select(0, (order + offsets).reshape(-1)).reshape(matrix.shape)


def _permute_columns(matrix: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return matrix.gather(-1, order.unsqueeze(-2).expand_as(matrix))


def qr_eigenbasis_refresh(
    matrix: torch.Tensor | Sequence[torch.Tensor],
    eigenvectors: torch.Tensor | Sequence[torch.Tensor],
    iterations: int = 1,
    *,
    exact_eigenvalues: bool = True,
) -> EigenbasisRefresh:
    """Improve eigenvector estimates ``Q`` of symmetric ``A`` by warm-started subspace iteration.

    Each iteration sorts the columns of ``Q`` by descending Rayleigh quotient ``diag(QᵀAQ)`` and
    replaces ``Q`` with the orthonormal factor of ``A Q`` (signs fixed so ``diag(R) ≥ 0``, making an
    exact eigenbasis of a PSD matrix a fixed point). This is the eigenbasis update of SOAP
    (Vyas et al., 2024, "SOAP: Improving and Stabilizing Shampoo using Adam").

    One product ``A Q`` per iteration serves both the quotients (``diag(Qᵀ (AQ))``) and the
    power step (sorting permutes the columns of ``AQ`` as it does those of ``Q``). With
    ``exact_eigenvalues=True`` the eigenvalues are the Rayleigh quotients of the returned basis
    (one more product ``A Q``), which is then sorted by them. With ``False`` they are the
    quotients of the last warm start, in the order the basis was orthonormalized — SOAP's own
    refresh, for callers that only need the basis and ``order``.

    ``matrix`` and ``eigenvectors`` may also be sequences of ``(B_i, d, d)`` stacks (the same
    ``B_i`` in both): they are refreshed as the one batch of their concatenation, which is
    never formed (each product writes its stack's slice of the batch).
    """
    matrices = [matrix] if isinstance(matrix, torch.Tensor) else list(matrix)
    bases = [eigenvectors] if isinstance(eigenvectors, torch.Tensor) else list(eigenvectors)
    if len(matrices) != len(bases) or not matrices:
        raise ValueError(
            f"need one eigenvector stack per matrix stack: {len(matrices)} matrix stacks, "
            f"got {len(bases)}"
        )
    for member, basis in zip(matrices, bases):
        check_square("matrix", member)
        if basis.shape != member.shape:
            raise ValueError(
                f"eigenvectors must have the shape of matrix {tuple(member.shape)}, "
                f"got {tuple(basis.shape)}"
            )
    size = matrices[0].shape[-1]
    if len(matrices) > 1 and any(m.ndim != 3 or m.shape[-1] != size for m in matrices):
        raise ValueError("stacks refreshed as one batch must all be (B_i, d, d) with the same d")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    dtype = working_dtype(matrices[0].dtype)
    matrices = [member.to(dtype) for member in matrices]
    bases = [_column_major(basis.to(dtype)) for basis in bases]
    sizes = [member.shape[0] for member in matrices]
    batch_shape = matrices[0].shape[:-2] if len(matrices) == 1 else (sum(sizes),)
    total_order = torch.arange(size, device=matrices[0].device).expand(*batch_shape, size)
    for _ in range(iterations):
        # ``Qᵀ A = (A Q)ᵀ`` (A symmetric), formed row-major: its rows are the columns of ``A Q``.
        # That one product gives the quotients (row-wise dots with ``Qᵀ``, a contiguous
        # reduction), the sort is a gather of whole rows, and its transposed view is the
        # column-major ``A Q`` LAPACK's geqrf works on, so torch makes no layout copy.
        image_rows, quotients = _image_rows(matrices, bases)
        quotients, order = quotients.sort(dim=-1, descending=True)
        total_order = total_order.gather(-1, order)
        # geqrf + householder_product: Q without forming R (its diagonal is that of
        # ``reflectors``). Both run in place on the permuted image, a temporary of ours: LAPACK
        # overwrites its input, so out-of-place calls would first copy it (twice per refresh).
        reflectors = _permute_rows(image_rows, order).mT
        scales = reflectors.new_empty(reflectors.shape[:-1])
        torch.geqrf(reflectors, out=(reflectors, scales))
        signs = torch.diagonal(reflectors, dim1=-2, dim2=-1).sign()  # before Q overwrites R
        basis = torch.linalg.householder_product(reflectors, scales, out=reflectors)
        basis.mul_(torch.where(signs == 0, 1.0, signs).unsqueeze(-2))
        bases = [basis] if len(matrices) == 1 else list(basis.split(sizes))
    if not exact_eigenvalues:
        return EigenbasisRefresh(quotients, basis, total_order)
    # QR keeps column k tied to input column k, so a final sort keeps ``order`` consistent.
    eigenvalues, final = _image_rows(matrices, bases)[1].sort(dim=-1, descending=True)
    return EigenbasisRefresh(
        eigenvalues, _permute_columns(basis, final), total_order.gather(-1, final)
    )


def _column_major(basis: torch.Tensor) -> torch.Tensor:
    # Keep bases column-major (what LAPACK returns): ``Qᵀ`` is then contiguous, so the
    # quotients pair two row-major operands (a transposed elementwise pairing is far slower at
    # large d). One transposing copy, only for a row-major warm start.
    return basis if basis.mT.is_contiguous() else basis.mT.contiguous().mT


def _image_rows(
    matrices: list[torch.Tensor], bases: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Qᵀ A`` of every stack as one batch, and its quotients ``diag(Qᵀ A Q)``."""
    if len(matrices) == 1:
        rows = bases[0].mT @ matrices[0]
        return rows, _row_dots(rows, bases[0].mT)
    total, size = sum(m.shape[0] for m in matrices), matrices[0].shape[-1]
    rows = matrices[0].new_empty(total, size, size)
    quotients = matrices[0].new_empty(total, size)
    start = 0
    for matrix, basis in zip(matrices, bases):
        stop = start + matrix.shape[0]
        torch.matmul(basis.mT, matrix, out=rows[start:stop])
        quotients[start:stop] = _row_dots(rows[start:stop], basis.mT)
        start = stop
    return rows, quotients
