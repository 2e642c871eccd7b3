"""One damping rule for every damped power of a Kronecker eigenbasis.

A damped power is ``Q f(Λ) Qᵀ`` with ``f(λ) = (λ + δ)^p``. Where ``δ`` is added, and how large
it is, differ between methods; the four rules cover every use in the library:

* ``"absolute"``: ``δ = value`` added to the eigenvalue tensor ``Λ``, ``(H + δI)^p``
  (influence functions with an explicit damping).
* ``"relative_to_mean"``: ``δ = value · mean(Λ)`` per block (K-FAC / EK-FAC influence
  functions, Grosse et al. 2023).
* ``"per_factor"``: each factor damped on its own, ``⊗_k (F_k + δ_k I)^p`` with
  ``δ_k = value · mean(λ_k)`` — the damping under which a power stays a Kronecker product
  (folded / whitened gradient compression).
* ``"per_factor_absolute"``: ``⊗_k (F_k + δ I)^p`` with ``δ = value`` (Shampoo's ``ε``,
  Gupta et al. 2018).

Factor-wise rules clamp negative round-off eigenvalues to 0 first (a fractional power of a
negative number is NaN); the tensor-wise rules leave ``Λ`` as it is, so a caller can see that
``Λ + δ`` is not positive and say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

DampingKind = Literal["absolute", "relative_to_mean", "per_factor", "per_factor_absolute"]
DAMPING_KINDS: tuple[str, ...] = get_args(DampingKind)
FACTORWISE_KINDS = ("per_factor", "per_factor_absolute")


@dataclass(frozen=True)
class Damping:
    """A damping rule: ``kind`` (one of :data:`DAMPING_KINDS`) and its ``value`` (``>= 0``)."""

    kind: DampingKind = "relative_to_mean"
    value: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in DAMPING_KINDS:
            raise ValueError(
                f"Invalid damping kind: {self.kind!r} "
                f"(allowed: {', '.join(map(repr, DAMPING_KINDS))})"
            )
        value = self.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"Invalid damping value: {value!r} (allowed: a finite number >= 0)")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"Invalid damping value: {value!r} (allowed: a finite number >= 0)")

    @property
    def factorwise(self) -> bool:
        """Whether each Kronecker factor is damped on its own (the power stays a product)."""
        return self.kind in FACTORWISE_KINDS

    def shift(self, eigenvalues: torch.Tensor, block_dims: int) -> torch.Tensor | float:
        """``δ`` for ``eigenvalues`` whose last ``block_dims`` dims form one block (one factor's
        spectrum, or one block's eigenvalue tensor): ``value``, or ``value`` times the block's
        mean eigenvalue (kept broadcastable against ``eigenvalues``)."""
        if self.kind in ("absolute", "per_factor_absolute"):
            return self.value
        dims = tuple(range(-block_dims, 0))
        return self.value * eigenvalues.mean(dim=dims, keepdim=True)


def factor_eigenvalue_powers(
    eigenvalues: torch.Tensor, exponent: float, damping: Damping, scale: float = 1.0
) -> torch.Tensor:
    """``(s · λ + δ)^exponent`` for one factor's spectrum ``(..., d)`` under a factor-wise rule,
    with negative round-off eigenvalues clamped to 0 (``s = scale``, e.g. ``1 / bc``).

    For ``"per_factor"`` ``δ`` is relative to the mean of the clamped, scaled spectrum.
    """
    if not damping.factorwise:
        raise ValueError(
            f"Invalid damping kind: {damping.kind!r} for a factor-wise power "
            f"(allowed: {', '.join(map(repr, FACTORWISE_KINDS))})"
        )
    values = eigenvalues.clamp_min(0.0)
    if scale != 1.0:
        values = values * scale
    return (values + damping.shift(values, 1)).pow(exponent)
