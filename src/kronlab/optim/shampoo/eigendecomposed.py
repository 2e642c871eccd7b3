"""Shampoo from cached eigenpairs (Shi et al., 2023, Distributed Shampoo).

State: ``eigenvectors`` ``[(B, d_i, d_i)]`` and ``eigenvalues`` ``[(B, d_i)]`` of each factor
``F_i`` at the last refresh (not bias-corrected: the current correction is applied per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kronlab.factors.inverse import damped_inverse_root_scales
from kronlab.factors.kronecker import kronecker_outer, precondition_in_eigenbasis
from kronlab.optim.shampoo.kl import inverse_sqrts_from_eigenpairs
from kronlab.optim.shampoo.variant import (
    InverseRootOptions,
    Refreshed,
    ShampooVariant,
    State,
    StepInputs,
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

    def inverse_sqrts(self, state: State) -> list[torch.Tensor] | None:
        if "eigenvalues" not in state:
            return None
        scale = 1.0 / self.factor_correction(state)
        return inverse_sqrts_from_eigenpairs(
            state["eigenvalues"], state["eigenvectors"], self.settings.epsilon, scale
        )

    def direction(self, state: State, inputs: StepInputs) -> torch.Tensor:
        exponent = self.exponent(inputs.filtered.ndim - 1)
        scale = 1.0 / self.factor_correction(state)
        scalings = [
            damped_inverse_root_scales(values, self.settings.epsilon, exponent, scale)
            for values in state["eigenvalues"]
        ]
        return precondition_in_eigenbasis(
            inputs.filtered, state["eigenvectors"], kronecker_outer(scalings)
        )


@dataclass(frozen=True)
class EigendecomposedConfig(InverseRootOptions):
    """Shampoo from cached eigenpairs ``F = Q Λ Qᵀ``: ``Q diag((Λ/bc + ε)^{-p}) Qᵀ`` applied with
    the current bias correction (Shi et al., 2023, Distributed Shampoo). ``exponent_override``
    and ``eigenbasis``: as in ``RootInverseConfig``."""

    name: str = "eigendecomposed"

    variant: ClassVar[type[ShampooVariant]] = EigendecomposedShampoo
