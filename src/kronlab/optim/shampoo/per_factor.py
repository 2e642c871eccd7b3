"""Per-factor eigenvalue-corrected Shampoo (seed 000, Distributed Shampoo PR #264): m+n
eigenvalues per block, measured on each step's outer products in the factors' eigenbasis.

State: ``eigenvectors`` ``[(B, d_i, d_i)]`` (the identity basis until the first refresh),
``eigenvalue_ema`` ``[(B, d_i)]`` = ``E_k`` and ``correction_step`` (updates of ``E_k``, for
its bias correction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from kronlab.factors.correction import follow_columns, update_factor_eigenvalues_
from kronlab.factors.eigenbasis import KroneckerEigenbasis
from kronlab.optim.shampoo.kl import inverse_sqrts
from kronlab.optim.shampoo.settings import StackSettings
from kronlab.optim.shampoo.variant import (
    InverseRootOptions,
    Refreshed,
    ShampooVariant,
    State,
    StepInputs,
    check_factor_beta,
    corrected_spectra,
    identity_basis_unless_refreshed,
    inverse_exponent,
)
from kronlab.optim.validation import check_choice

StepOrder = Literal["soap", "distributed_shampoo"]


class PerFactorCorrectedShampoo(ShampooVariant):
    """``E_k ← β₂ E_k + (1 − β₂) diag(Q_kᵀ O_t Q_k)`` and direction
    ``Q[(QᵀM) ⊙ ⊗_k(E_k/bc + ε)^{-p}]Qᵀ``; a refresh changes ``Q_k`` only, never ``E_k``."""

    reads_outer_products = True
    supports_kl = True
    exported_eigenvalues = "eigenvalue_ema"

    def __init__(self, settings: StackSettings) -> None:
        super().__init__(settings)
        # SOAP's order: precondition with the previous basis and refresh after the step, each
        # ``E_k`` entry following its eigenvector column; Distributed Shampoo's: measure and
        # refresh first, keeping eigh's index order.
        self.distributed_shampoo_order = self.config.step_order == "distributed_shampoo"
        self.refresh_after_step = not self.distributed_shampoo_order
        self.tracks_columns = not self.distributed_shampoo_order

    @property
    def factor_beta(self) -> float:
        own = self.config.factor_beta
        return self.settings.beta2 if own is None else own

    def exponent(self, num_factors: int) -> float:
        return inverse_exponent(self.config.exponent_override, self.settings.kl, num_factors)

    def is_refresh_step(self, step: int) -> bool:
        """Distributed Shampoo's order refreshes at the start step and at every step divisible
        by the frequency after it."""
        if not self.distributed_shampoo_order:
            return super().is_refresh_step(step)
        start = self.settings.start_preconditioning_step
        if step < start:
            return False
        return step == int(start) or step % self.settings.precondition_frequency == 0

    def store(self, state: State, refreshed: Refreshed) -> None:
        if "eigenvectors" in state and not self.distributed_shampoo_order:
            state["eigenvalue_ema"] = [
                follow_columns(ema, [order])
                for ema, order in zip(state["eigenvalue_ema"], refreshed.orders)
            ]
        state["eigenvectors"] = refreshed.eigenvectors

    def eigenbasis(self, state: State) -> KroneckerEigenbasis | None:
        if not state.get("correction_step"):
            return None
        return corrected_spectra(
            state["eigenvectors"], state["eigenvalue_ema"], self.eigenvalue_correction(state)
        )

    def inverse_sqrts(self, state: State) -> list[torch.Tensor] | None:
        basis = self.eigenbasis(state)
        return None if basis is None else inverse_sqrts(basis, self.damping)

    def measure(
        self, state: State, gradient: torch.Tensor, products: Sequence[torch.Tensor]
    ) -> None:
        """Distributed Shampoo's order: ``E_k`` measured on this step's outer products in the
        current basis (the identity before the first refresh), every step, before any refresh."""
        if self.distributed_shampoo_order:
            state["correction_step"] = state.get("correction_step", 0) + 1
            self._accumulate(state, identity_basis_unless_refreshed(state, gradient), products)

    def direction(self, state: State, inputs: StepInputs) -> torch.Tensor:
        filtered = inputs.filtered
        eigenvectors = identity_basis_unless_refreshed(state, filtered)
        if not self.distributed_shampoo_order:  # else ``E_k`` was updated with the statistics
            state["correction_step"] = state.get("correction_step", 0) + 1
            self._accumulate(state, eigenvectors, inputs.products)
        basis = self.eigenbasis(state)
        assert basis is not None  # measured above or with the statistics
        return basis.damped_power(filtered, -self.exponent(filtered.ndim - 1), self.damping)

    def _accumulate(
        self, state: State, eigenvectors: Sequence[torch.Tensor], products: Sequence[torch.Tensor]
    ) -> None:
        if "eigenvalue_ema" not in state:
            state["eigenvalue_ema"] = [torch.zeros_like(product[..., 0]) for product in products]
        for ema, vectors, product in zip(state["eigenvalue_ema"], eigenvectors, products):
            update_factor_eigenvalues_(ema, vectors, product, self.settings.beta2)


@dataclass(frozen=True)
class PerFactorEigenvalueCorrectedConfig(InverseRootOptions):
    """m+n eigenvalues per block: ``E_k ← β₂ E_k + (1 − β₂) diag(Q_kᵀ O_t Q_k)``, zero-initialised
    and bias-corrected; refreshes change ``Q_k`` only (seed 000, Distributed Shampoo PR #264).

    ``step_order`` says when ``E_k`` and ``Q_k`` move relative to the direction:

    * ``"soap"`` (default): precondition with the previous ``Q_k``, refresh after the step (a
      basis never contains the gradient it measures); ``E_k`` starts at the first preconditioned
      step and each entry follows its eigenvector column across a refresh.
    * ``"distributed_shampoo"``: the pull request's order: every step from the first, update the
      factors and ``E_k`` (measured in the current ``Q_k``), refresh ``Q_k`` from the factors
      that include this gradient (steps ``t % precondition_frequency == 0`` after
      ``start_preconditioning_step``, and that step itself), then precondition with the new
      ``Q_k``; ``E_k`` keeps its index order across a refresh (``eigh``'s ascending order).
    """

    factor_beta: float | None = None
    step_order: StepOrder = "soap"
    name: str = "per_factor_eigenvalue_corrected"

    variant: ClassVar[type[ShampooVariant]] = PerFactorCorrectedShampoo

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("step_order", self.step_order, ("soap", "distributed_shampoo"))
        check_factor_beta(self.factor_beta)
