"""Shampoo from cached eigenpairs (Shi et al., 2023, Distributed Shampoo).

State: ``eigenvectors`` ``[(B, d_i, d_i)]`` and ``eigenvalues`` ``[(B, d_i)]`` of each factor
``F_i`` at the last refresh (not bias-corrected: the current correction is applied per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kronlab.factors.eigenbasis import KroneckerEigenbasis
from kronlab.optim.shampoo.kl import inverse_sqrts
from kronlab.optim.shampoo.variant import (
    InverseRootOptions,
    Refreshed,
    ShampooVariant,
    State,
    StepInputs,
    corrected_spectra,
    inverse_exponent,
)


class EigendecomposedShampoo(ShampooVariant):
    """Direction ``Q[(QᵀM) ⊙ ⊗_i(λ_i/bc + ε)^{-p}]Qᵀ`` from the cached eigenpairs."""

    supports_kl = True

    def exponent(self, num_factors: int) -> float:
        return inverse_exponent(self.config.exponent_override, self.settings.kl, num_factors)

    def store(self, state: State, refreshed: Refreshed) -> None:
        # a failed refresh already returned the previous eigenpairs (``previous_eigenpairs``)
        state["eigenvalues"] = refreshed.eigenvalues
        state["eigenvectors"] = refreshed.eigenvectors

    def eigenbasis(self, state: State) -> KroneckerEigenbasis | None:
        if "eigenvalues" not in state:
            return None
        return corrected_spectra(
            state["eigenvectors"], state["eigenvalues"], self.factor_correction(state)
        )

    def inverse_sqrts(self, state: State) -> list[torch.Tensor] | None:
        basis = self.eigenbasis(state)
        return None if basis is None else inverse_sqrts(basis, self.damping)

    def direction(self, state: State, inputs: StepInputs) -> torch.Tensor:
        basis = self.eigenbasis(state)
        assert basis is not None  # refreshed before the first preconditioned step
        exponent = self.exponent(inputs.filtered.ndim - 1)
        return basis.damped_power(inputs.filtered, -exponent, self.damping)


@dataclass(frozen=True)
class EigendecomposedConfig(InverseRootOptions):
    """Shampoo from cached eigenpairs ``F = Q Λ Qᵀ``: ``Q diag((Λ/bc + ε)^{-p}) Qᵀ`` applied with
    the current bias correction (Shi et al., 2023, Distributed Shampoo). ``exponent_override``
    and ``eigenbasis``: as in ``RootInverseConfig``."""

    name: str = "eigendecomposed"

    variant: ClassVar[type[ShampooVariant]] = EigendecomposedShampoo
