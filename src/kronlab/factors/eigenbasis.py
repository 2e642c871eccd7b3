"""Amortized eigendecomposition of stacked Kronecker factors, robust to failures.

A refresh decomposes a whole stack ``(B, d, d)`` in one batched call, by ``eigh`` or by one
warm-started QR power-iteration step (SOAP, Vyas et al., 2024). Where a decomposition fails or a
factor is non-finite the previous eigenbasis is kept, a per-factor counter of consecutive failures
is increased, and a warning is issued; the caller decides when too many failures are an error.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

from kronlab.linalg.batching import concatenate_matrices
from kronlab.linalg.eigh import eigh
from kronlab.linalg.finite import finite_matrices
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
    factors: torch.Tensor | Sequence[torch.Tensor],
    previous_eigenvectors: torch.Tensor | Sequence[torch.Tensor] | None,
    previous_eigenvalues: torch.Tensor | None,
    failures: torch.Tensor,
    *,
    method: EigenbasisMethod = "eigh",
    float64: bool = False,
    max_consecutive_failures: int = 5,
    name: str = "factor",
    track_columns: bool = True,
    exact_eigenvalues: bool = True,
) -> RefreshedEigenbasis:
    """Decompose ``factors`` (ascending eigenvalues for eigh, descending for QR).

    ``method="qr"`` needs ``previous_eigenvectors`` and falls back to eigh without them. Without
    a previous decomposition a failed factor gets the identity basis and zero eigenvalues.
    Raises ``DecompositionFailed`` once any factor has failed ``max_consecutive_failures``
    times in a row (one host sync per refresh, which is amortized).

    ``factors`` (and ``previous_eigenvectors``) may be sequences of ``(B_i, d, d)`` stacks,
    decomposed as the one batch of their concatenation; the QR refresh then never forms that
    concatenation (the usual, all-finite case), eigh needs it.

    Callers that keep no per-column state pass ``track_columns=False`` (``order`` is then the
    identity, saving eigh's ranking product ``F Q_old``); callers that use only the basis pass
    ``exact_eigenvalues=False`` (the QR refresh then returns the warm start's Rayleigh quotients,
    saving a product, see ``qr_eigenbasis_refresh``).
    """
    stacks = [factors] if isinstance(factors, torch.Tensor) else list(factors)
    previous_stacks = (
        None
        if previous_eigenvectors is None
        else [previous_eigenvectors]
        if isinstance(previous_eigenvectors, torch.Tensor)
        else list(previous_eigenvectors)
    )
    like = stacks[0]
    # One host sync: in the usual all-finite case no masking pass over the factors is needed.
    finite = finite_matrices(factors if isinstance(factors, torch.Tensor) else stacks)
    all_finite = bool(finite.all())
    if method == "qr" and previous_stacks is not None:
        work = stacks
        if not all_finite:  # non-finite factors become the identity so QR cannot fail on them
            identity = torch.eye(like.shape[-1], dtype=like.dtype, device=like.device)
            work = [torch.where(finite[..., None, None], concatenate_matrices(stacks), identity)]
            previous_stacks = [concatenate_matrices(previous_stacks)]
        if float64:
            work = [stack.double() for stack in work]
        values, vectors, order = qr_eigenbasis_refresh(
            work,
            [stack.to(work[0].dtype) for stack in previous_stacks],
            exact_eigenvalues=exact_eigenvalues,
        )
        ok = finite & finite_matrices(vectors) & torch.isfinite(values).all(-1)
        if not track_columns:
            order = None
    else:
        ranks_columns = previous_stacks is not None and track_columns
        # Without the ranking below several stacks go as a list: their concatenation is then
        # the copy eigh works in, not one more copy.
        factors = stacks if len(stacks) > 1 and not ranks_columns else concatenate_matrices(stacks)
        values, vectors, ok = eigh(factors, float64=float64)
        order = None
        if ranks_columns:
            # eigh sorts ascending; old column j continues as the new column whose rank its
            # Rayleigh quotient under the new factor has (exact when the basis is unchanged).
            finite_factors = (
                factors if all_finite else torch.where(finite[..., None, None], factors, 0.0)
            )
            order = rayleigh_quotients(
                finite_factors, concatenate_matrices(previous_stacks)
            ).argsort(dim=-1)
    values, vectors = values.to(like.dtype), vectors.to(like.dtype)
    identity_order = torch.arange(like.shape[-1], device=like.device).expand(values.shape)
    if bool(ok.all()):  # the usual case: nothing to fall back to, no masking passes
        failures = torch.zeros_like(failures)
        order = identity_order if order is None else order
        return RefreshedEigenbasis(values, vectors, failures, ok, order)
    if previous_stacks is None:
        previous = torch.eye(like.shape[-1], dtype=like.dtype, device=like.device).expand_as(
            vectors
        )
        previous_eigenvalues = torch.zeros_like(values)
    else:
        previous = concatenate_matrices(previous_stacks)
        if previous_eigenvalues is None:
            previous_eigenvalues = torch.zeros_like(values)
    vectors = torch.where(ok[..., None, None], vectors, previous)
    values = torch.where(ok[..., None], values, previous_eigenvalues)
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
