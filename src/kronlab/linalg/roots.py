"""Inverse p-th roots of symmetric positive semi-definite matrices."""

from __future__ import annotations

from typing import Literal

import torch

from kronlab.linalg._dtypes import check_square, working_dtype
from kronlab.linalg.eigh import eigh


def _check_root(root: float) -> None:
    if not root > 0:
        raise ValueError(f"root must be > 0, got {root}")


def inverse_root_from_eigh(
    eigenvalues: torch.Tensor,
    eigenvectors: torch.Tensor,
    root: float,
    *,
    pseudo_inverse: bool = False,
    rank_rtol: float | None = None,
) -> torch.Tensor:
    """``Q diag(λ^{-1/root}) Qᵀ`` from a (stacked) eigendecomposition.

    Eigenvalues below ``λ_max · eps(dtype) · n`` are numerical noise: they are floored there, or,
    with ``pseudo_inverse=True``, every eigenvalue below ``rank_rtol · λ_max`` (default
    ``n · eps``) is treated as zero and its direction is dropped (Moore–Penrose inverse root).
    """
    _check_root(root)
    n = eigenvalues.shape[-1]
    eps = torch.finfo(eigenvalues.dtype).eps
    largest = (
        eigenvalues.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(eigenvalues.dtype).tiny)
    )
    if pseudo_inverse:
        threshold = largest * (n * eps if rank_rtol is None else rank_rtol)
        kept = eigenvalues > threshold
        scales = torch.where(kept, eigenvalues.clamp_min(torch.finfo(eigenvalues.dtype).tiny), 1.0)
        scales = torch.where(kept, scales.pow(-1.0 / root), 0.0)
    else:
        scales = eigenvalues.clamp_min(largest * n * eps).pow(-1.0 / root)
    return (eigenvectors * scales.unsqueeze(-2)) @ eigenvectors.transpose(-1, -2)


def matrix_inverse_root(
    matrix: torch.Tensor,
    root: float,
    epsilon: float = 0.0,
    *,
    method: Literal["eigh", "newton"] = "eigh",
    pseudo_inverse: bool = False,
    rank_rtol: float | None = None,
    newton_iterations: int = 100,
    newton_tolerance: float | None = None,
) -> torch.Tensor:
    """``(A + εI)^{-1/root}`` for a symmetric PSD matrix or stack ``(..., n, n)``.

    ``method="eigh"`` uses a robust eigendecomposition (``kronlab.linalg.eigh``);
    ``method="newton"`` the coupled Newton iteration of Guo & Higham (2006, "A Schur–Newton
    method for the matrix p-th root and its inverse"), which needs only matrix products.
    Matrices whose decomposition fails come back as NaN so a caller can detect and skip them.
    Half inputs are computed and returned in float32.
    """
    check_square("matrix", matrix)
    _check_root(root)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if method not in ("eigh", "newton"):
        raise ValueError(f"method must be 'eigh' or 'newton', got {method!r}")
    if pseudo_inverse and method != "eigh":
        raise ValueError("pseudo_inverse=True needs method='eigh'")
    dtype = working_dtype(matrix.dtype)
    identity = torch.eye(matrix.shape[-1], dtype=dtype, device=matrix.device)
    damped = matrix.to(dtype) + epsilon * identity
    if method == "newton":
        return coupled_newton_inverse_root(
            damped, root, iterations=newton_iterations, tolerance=newton_tolerance
        )
    decomposition = eigh(damped)
    inverse_root = inverse_root_from_eigh(
        decomposition.eigenvalues,
        decomposition.eigenvectors,
        root,
        pseudo_inverse=pseudo_inverse,
        rank_rtol=rank_rtol,
    )
    nan = torch.full_like(inverse_root, float("nan"))
    return torch.where(decomposition.ok[..., None, None], inverse_root, nan)


def coupled_newton_inverse_root(
    matrix: torch.Tensor,
    root: float,
    *,
    iterations: int = 100,
    tolerance: float | None = None,
) -> torch.Tensor:
    """Coupled Newton iteration for ``A^{-1/p}`` of a symmetric positive definite stack.

    With ``z = (1 + p) / (2‖A‖_F)``: ``X₀ = z^{1/p} I``, ``M₀ = z A``; each step
    ``T = ((p+1)I − M)/p``, ``X ← X T``, ``M ← T^p M``; ``M → I`` and ``X → A^{-1/p}``.
    Stops when ``max|M − I| < tolerance`` for every matrix (one host sync per iteration).
    Integer ``p`` only: ``T^p`` is a matrix power.
    """
    if root != int(root) or root < 1:
        raise ValueError(f"coupled Newton needs an integer root >= 1, got {root}")
    p = int(root)
    dtype = working_dtype(matrix.dtype)
    matrix = matrix.to(dtype)
    if tolerance is None:
        tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    identity = torch.eye(matrix.shape[-1], dtype=dtype, device=matrix.device)
    norm = torch.linalg.matrix_norm(matrix).clamp_min(torch.finfo(dtype).tiny)[..., None, None]
    z = (1 + p) / (2 * norm)
    inverse_root = z.pow(1.0 / p) * identity
    residual_matrix = z * matrix
    for _ in range(iterations):
        step = ((p + 1) * identity - residual_matrix) / p
        inverse_root = inverse_root @ step
        residual_matrix = torch.linalg.matrix_power(step, p) @ residual_matrix
        if (residual_matrix - identity).abs().amax() < tolerance:
            break
    return inverse_root
