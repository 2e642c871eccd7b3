"""KL-Shampoo (Lin et al., 2025): statistics preconditioned by the other factors' inverse roots.

``L ← β₂ L + (1 − β₂)/n · G R^{-1} Gᵀ`` and ``R ← β₂ R + (1 − β₂)/m · Gᵀ L^{-1} G``, with the
stale inverses of the variant it runs on (root-inverse, eigendecomposed or per-factor
eigenvalue-corrected: ``ShampooVariant.supports_kl``), and direction ``L^{-1/2} M R^{-1/2}``
(exponent 1/2). The statistics themselves are ``statistics.update_factors_``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from kronlab.factors.damping import Damping
from kronlab.factors.eigenbasis import KroneckerEigenbasis

if TYPE_CHECKING:
    from kronlab.optim.shampoo.variant import ShampooVariant, State


def kl_inverse_sqrts(
    variant: ShampooVariant, state: State, num_factors: int
) -> list[torch.Tensor | None] | None:
    """``F_j^{-1/2}`` per axis for KL-Shampoo's statistics; ``None`` for plain Shampoo.

    Before the variant has an inverse (before the first refresh, or while per-factor
    eigenvalues are still zero) the entries are ``None``: the gradient is used unpreconditioned.
    """
    if not variant.settings.kl:
        return None
    roots = variant.inverse_sqrts(state)
    return [None] * num_factors if roots is None else list(roots)


def inverse_sqrts(basis: KroneckerEigenbasis, damping: Damping) -> list[torch.Tensor]:
    """``(Q diag(λ + ε) Qᵀ)^{-1/2}`` per axis from a cached eigenbasis, the identity for blocks
    whose eigenvalues are all zero (e.g. after an all-zero gradient): ``ε^{-1/2}`` there would
    multiply the next outer product by ``1/ε`` and the EMA would carry it (Distributed Shampoo
    skips the same)."""
    assert basis.eigenvalues is not None
    roots = []
    for values, root in zip(basis.eigenvalues, basis.factor_powers(-0.5, damping)):
        unmeasured = (values == 0).all(dim=-1)[..., None, None]
        identity = torch.eye(root.shape[-1], dtype=root.dtype, device=root.device)
        roots.append(torch.where(unmeasured, identity, root))
    return roots


def check_kl(preconditioner: Any, supports_kl: bool, allowed: Sequence[str]) -> None:
    """``kl=True`` needs a variant with inverse roots and KL-Shampoo's exponent 1/2."""
    if not supports_kl:
        raise ValueError(
            f"Invalid kl: True with preconditioner {preconditioner.name!r} "
            f"(allowed: kl=True with one of {list(allowed)})"
        )
    override = preconditioner.exponent_override
    if override is not None and override != 0.5:
        raise ValueError(
            f"Invalid exponent_override: {override!r} with kl=True "
            "(allowed: None or 0.5, KL-Shampoo's exponent)"
        )
