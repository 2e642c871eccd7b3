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


def bias_correction(beta: float, count: int, enabled: bool = True) -> float:
    """``1 − β^count``: the weight an EMA started at zero has gathered after ``count`` updates.

    ``1`` when disabled, for ``β = 1`` (a sum needs no correction) or before any update.
    """
    if not enabled or beta == 1.0 or count == 0:
        return 1.0
    return 1.0 - beta**count
