"""Amortized eigendecomposition of stacked Kronecker factors, robust to failures.

A refresh decomposes a whole stack ``(B, d, d)`` in one batched call, by ``eigh`` or by one
warm-started QR power-iteration step (SOAP, Vyas et al., 2024). Where a decomposition fails or a
factor is non-finite the previous eigenbasis is kept, a per-factor counter of consecutive failures
is increased, and a warning is issued; the caller decides when too many failures are an error.
"""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple

import torch

from kronlab.linalg.eigh import eigh
from kronlab.linalg.qr import qr_eigenbasis_refresh, rayleigh_quotients

EigenbasisMethod = Literal["eigh", "qr"]


class RefreshedEigenbasis(NamedTuple):
    """Eigenvectors ``(B, d, d)``, eigenvalues ``(B, d)``, consecutive failures ``(B,)``.

    ``ok`` is ``False`` where the previous decomposition was kept. ``order`` ``(B, d)``: new
    column k continues previous column ``order[k]`` (a QR refresh re-sorts the warm start by
    Rayleigh quotient; for eigh the previous columns are ranked by their Rayleigh quotients under
    the new factor, matching eigh's ascending order), so per-column state follows with
    ``state.gather(-1, order)``.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    failures: torch.Tensor
    ok: torch.Tensor
    order: torch.Tensor


class DecompositionFailed(RuntimeError):
    """Raised when a factor failed to decompose too many times in a row."""


def refresh_eigenbasis(
    factors: torch.Tensor,
    previous_eigenvectors: torch.Tensor | None,
    previous_eigenvalues: torch.Tensor | None,
    failures: torch.Tensor,
    *,
    method: EigenbasisMethod = "eigh",
    float64: bool = False,
    max_consecutive_failures: int = 5,
    name: str = "factor",
) -> RefreshedEigenbasis:
    """Decompose ``factors`` (ascending eigenvalues for eigh, descending for QR).

    ``method="qr"`` needs ``previous_eigenvectors`` and falls back to eigh without them. Without
    a previous decomposition a failed factor gets the identity basis and zero eigenvalues.
    Raises ``DecompositionFailed`` once any factor has failed ``max_consecutive_failures``
    times in a row (one host sync per refresh, which is amortized).
    """
    if method == "qr" and previous_eigenvectors is not None:
        finite = torch.isfinite(factors).flatten(-2).all(-1)
        identity = torch.eye(factors.shape[-1], dtype=factors.dtype, device=factors.device)
        # Non-finite factors are swapped for the identity so QR cannot fail on them.
        safe = torch.where(finite[..., None, None], factors, identity)
        work = safe.double() if float64 else safe
        refreshed = qr_eigenbasis_refresh(work, previous_eigenvectors.to(work.dtype))
        values, vectors, order = refreshed
        ok = finite & torch.isfinite(vectors).flatten(-2).all(-1) & torch.isfinite(values).all(-1)
    else:
        decomposition = eigh(factors, float64=float64)
        values, vectors, ok = decomposition
        order = None
        if previous_eigenvectors is not None:
            # eigh sorts ascending; old column j continues as the new column whose rank its
            # Rayleigh quotient under the new factor has (exact when the basis is unchanged).
            quotients = rayleigh_quotients(
                torch.where(torch.isfinite(factors), factors, 0.0), previous_eigenvectors
            )
            order = quotients.argsort(dim=-1)
    values, vectors = values.to(factors.dtype), vectors.to(factors.dtype)
    if previous_eigenvectors is None:
        previous_eigenvectors = torch.eye(
            factors.shape[-1], dtype=factors.dtype, device=factors.device
        ).expand_as(factors)
        previous_eigenvalues = torch.zeros_like(values)
    elif previous_eigenvalues is None:
        previous_eigenvalues = torch.zeros_like(values)
    vectors = torch.where(ok[..., None, None], vectors, previous_eigenvectors)
    values = torch.where(ok[..., None], values, previous_eigenvalues)
    identity_order = torch.arange(factors.shape[-1], device=factors.device).expand(values.shape)
    order = identity_order if order is None else torch.where(ok[..., None], order, identity_order)
    failures = torch.where(ok, torch.zeros_like(failures), failures + 1)
    worst = int(failures.max()) if failures.numel() else 0
    if worst:
        if worst >= max_consecutive_failures:
            raise DecompositionFailed(
                f"{name}: eigendecomposition failed {worst} times in a row "
                f"(max_consecutive_failures={max_consecutive_failures})"
            )
        warnings.warn(
            f"{name}: eigendecomposition failed for {int((~ok).sum())} of {ok.numel()} "
            "factors; keeping their previous preconditioner",
            RuntimeWarning,
            stacklevel=2,
        )
    return RefreshedEigenbasis(values, vectors, failures, ok, order)
