"""Classic Shampoo (Gupta et al., 2018): a cached damped inverse root per factor.

State: ``inverse_roots`` ``[(B, d_i, d_i)]`` = ``(F_i/bc + εI)^{-p}`` at the last refresh, and
with a QR refresh ``eigenvectors`` ``[(B, d_i, d_i)]`` (the next refresh's warm start).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kronlab.factors.inverse import damped_inverse_root, damped_inverse_root_
from kronlab.factors.kronecker import kronecker_product_apply
from kronlab.optim.shampoo.variant import (
    InverseRootOptions,
    Refreshed,
    ShampooVariant,
    State,
    StepInputs,
    inverse_exponent,
)


class RootInverseShampoo(ShampooVariant):
    """Direction ``M ×_1 P_1 ⋯ ×_k P_k`` with the cached ``P_i = (F_i/bc + εI)^{-p}``."""

    supports_kl = True

    def exponent(self, num_factors: int) -> float:
        return inverse_exponent(self.config.exponent_override, self.settings.kl, num_factors)

    def store(self, state: State, refreshed: Refreshed) -> None:
        """Form the roots; a factor whose refresh failed keeps its previous root (the identity
        before the first)."""
        exponent = self.exponent(len(refreshed.eigenvalues))
        scale = 1.0 / self.factor_correction(state)
        warm_started = self.config.eigenbasis == "qr"
        # Without a QR warm start the eigenvectors are a refresh's temporaries: the root is
        # formed in their memory.
        form_root = damped_inverse_root if warm_started else damped_inverse_root_
        roots = []
        for axis, (values, vectors, good) in enumerate(zip(*refreshed[:3])):
            root = form_root(values, vectors, self.settings.epsilon, exponent, scale)
            if bool(good.all()):  # nothing to fall back to: skip the masking pass
                roots.append(root)
                continue
            previous = (
                state["inverse_roots"][axis]
                if "inverse_roots" in state
                else torch.eye(root.shape[-1], dtype=root.dtype, device=root.device).expand_as(root)
            )
            roots.append(torch.where(good[..., None, None], root, previous))
        state["inverse_roots"] = roots
        if warm_started:  # the next refresh's warm start
            state["eigenvectors"] = refreshed.eigenvectors

    def inverse_sqrts(self, state: State) -> list[torch.Tensor] | None:
        # under KL-Shampoo the exponent is 1/2: the cached roots are the inverse square roots
        return list(state["inverse_roots"]) if "inverse_roots" in state else None

    def direction(self, state: State, inputs: StepInputs) -> torch.Tensor:
        return kronecker_product_apply(inputs.filtered, state["inverse_roots"])


@dataclass(frozen=True)
class RootInverseConfig(InverseRootOptions):
    """Classic Shampoo (Gupta et al., 2018): cached ``(F/bc + εI)^{-p}`` per factor, recomputed
    every ``precondition_frequency`` steps; ``p = 1/(2k)`` for a k-factor block unless
    ``exponent_override`` is given. ``eigenbasis="qr"`` trades the exact ``eigh`` of a refresh
    for one warm-started QR power step from the previous basis, with the previous basis'
    Rayleigh quotients ``diag(Q_oldᵀ F Q_old)`` as eigenvalues (approximate; the first refresh
    is an eigh), as in Distributed Shampoo's QR-based eigendecomposition option."""

    name: str = "root_inv"

    variant: ClassVar[type[ShampooVariant]] = RootInverseShampoo
