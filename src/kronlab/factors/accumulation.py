"""Accumulating factor statistics: exponential moving average, or a running sum when β = 1."""

from __future__ import annotations

import torch


def accumulate_(state: torch.Tensor, sample: torch.Tensor, beta: float) -> torch.Tensor:
    """``S ← β S + (1 − β) X`` in place; ``β = 1`` accumulates the sum ``S ← S + X`` (AdaGrad).

    Used for Shampoo's factors ``L ← β₂ L + (1 − β₂) G Gᵀ`` (Gupta et al., 2018) and every other
    moment estimate of the Shampoo family.
    """
    if beta == 1.0:
        return state.add_(sample)
    return state.lerp_(sample.to(state.dtype), 1.0 - beta)


def accumulate_square_(state: torch.Tensor, sample: torch.Tensor, beta: float) -> torch.Tensor:
    """``S ← β S + (1 − β) X^{⊙2}`` in place (``β = 1``: ``S ← S + X^{⊙2}``), the second moment of
    Adam and of every eigenvalue correction; ``addcmul_`` squares on the fly, no temporary."""
    if beta == 1.0:
        return state.addcmul_(sample, sample)
    return state.mul_(beta).addcmul_(sample, sample, value=1.0 - beta)


# A symmetric ``X Xᵀ`` is split only where the saved quarter of the multiply-adds outweighs the
# smaller GEMMs and the mirror copy (smaller blocks lose); with a thin ``X`` the update is bound
# by the traffic over ``F``, which splitting does not reduce (step times: BENCHMARKS.md,
# "Shampoo family and SOAP").
_MIN_GRAM_BLOCK = 256
_MIN_GRAM_DEPTH = 256


def accumulate_gram_(
    factor: torch.Tensor, rows: torch.Tensor, beta: float, weight: float
) -> torch.Tensor:
    """``F ← β F + w X Xᵀ`` in place for stacks ``F`` ``(B, d, d)`` and ``X`` ``(B, d, k)``: the
    factor update of Shampoo (``X = G_(i)``, Gupta et al., 2018) with the product and the
    scaled add in the GEMM itself (no temporary, no extra pass over ``F``).

    ``X Xᵀ`` is symmetric, so for ``d ≥ 512`` (and ``k ≥ 256``) only its lower half is
    multiplied: the two diagonal blocks recursively, the lower off-diagonal block by one GEMM,
    then mirrored into the upper one: 3/4 of the multiply-adds per level.
    """
    size = factor.shape[-1]
    if size < 2 * _MIN_GRAM_BLOCK or rows.shape[-1] < _MIN_GRAM_DEPTH:
        return factor.baddbmm_(rows, rows.transpose(-1, -2), beta=beta, alpha=weight)
    half = size // 2
    top, bottom = rows[..., :half, :], rows[..., half:, :]
    accumulate_gram_(factor[..., :half, :half], top, beta, weight)
    accumulate_gram_(factor[..., half:, half:], bottom, beta, weight)
    lower = factor[..., half:, :half]
    lower.baddbmm_(bottom, top.transpose(-1, -2), beta=beta, alpha=weight)
    factor[..., :half, half:].copy_(lower.transpose(-1, -2))
    return factor


def bias_correction(beta: float, count: int, enabled: bool = True) -> float:
    """``1 − β^count``: the weight an EMA started at zero has gathered after ``count`` updates.

    ``1`` when disabled, for ``β = 1`` (a sum needs no correction) or before any update.
    """
    if not enabled or beta == 1.0 or count == 0:
        return 1.0
    return 1.0 - beta**count
