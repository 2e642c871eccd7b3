"""Eigenvalue-corrected Shampoo (EShampoo, George et al., 2018; SOAP, Vyas et al., 2024): Adam's
second moment kept in the eigenbasis of the Kronecker factors, one entry per coordinate.

State: ``eigenvectors`` ``[(B, d_i, d_i)]`` (the identity basis until the first refresh),
``second_moment`` ``(B, d_1, …, d_k)``, ``correction_step`` (updates of the second moment, for
its bias correction); without grafting, also ``eigenbasis_momentum`` (the first moment kept in
the eigenbasis, see ``filters_in_eigenbasis``) instead of the parameter-space ``momentum``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from kronlab.factors.accumulation import bias_correction
from kronlab.factors.correction import (
    follow_columns,
    transport_second_moment,
    update_second_moment_,
)
from kronlab.factors.eigenbasis import KroneckerEigenbasis
from kronlab.optim.shampoo.moments import adam_quotient_, momentum_numerator
from kronlab.optim.shampoo.settings import StackSettings
from kronlab.optim.shampoo.variant import (
    EigenbasisMethod,
    Refreshed,
    ShampooVariant,
    State,
    StepInputs,
    check_factor_beta,
    identity_basis_unless_refreshed,
)
from kronlab.optim.validation import check_choice


class EigenvalueCorrectedShampoo(ShampooVariant):
    """Direction ``Q[(QᵀM) / (√(E/bc) + ε)]Qᵀ`` with ``E ← β₂ E + (1 − β₂)(QᵀG)^{⊙2}``, the
    basis refreshed after the step (SOAP's order). Each second-moment entry follows its
    eigenvector column across a refresh, or is rotated into the new basis (``second_moment_carry``).
    """

    refresh_after_step = True
    tracks_columns = True

    @property
    def factor_beta(self) -> float:
        own = self.config.factor_beta
        return self.settings.beta2 if own is None else own

    def __init__(self, settings: StackSettings) -> None:
        super().__init__(settings)
        # The first moment is kept in the eigenbasis, ``M̃ = M ×_i Q_iᵀ``: exact (the rotation
        # is linear and the basis only changes at refreshes, where ``M̃`` is carried over by
        # ``Q_newᵀ Q_old``), and it saves rotating the momentum every step (2k instead of 4k
        # block products). Only without grafting and with preconditioning from the first step,
        # since otherwise ``M`` itself is needed in parameter space.
        self.filters_in_eigenbasis = (
            settings.grafting.method == "none" and settings.start_preconditioning_step <= 1
        )

    def store(self, state: State, refreshed: Refreshed) -> None:
        """Carry the estimates into the new basis (never recomputed, so nothing jumps)."""
        eigenvectors = refreshed.eigenvectors
        if "eigenvectors" in state:
            if "eigenbasis_momentum" in state:
                # M̃_new = M̃_old ×_i (Q_new,iᵀ Q_old,i), computed as back to parameter space and
                # into the new basis: 2k block products, never more work than forming the k
                # d_i×d_i overlaps and applying them (for m×n: 2mn(m+n) vs m³ + n³ + mn(m+n)).
                old = self.eigenbasis(state)
                new = dataclasses.replace(old, eigenvectors=tuple(eigenvectors))
                momentum = old.from_eigenbasis(state["eigenbasis_momentum"])
                state["eigenbasis_momentum"] = new.to_eigenbasis(momentum)
            if self.config.second_moment_carry == "rotate":
                state["second_moment"] = transport_second_moment(
                    state["second_moment"], eigenvectors, state["eigenvectors"]
                )
            else:
                state["second_moment"] = follow_columns(state["second_moment"], refreshed.orders)
        state["eigenvectors"] = eigenvectors

    def direction(self, state: State, inputs: StepInputs) -> torch.Tensor:
        settings, (gradient, filtered, _) = self.settings, inputs
        if "eigenvectors" not in state and self.filters_in_eigenbasis:
            # SOAP's first step: no basis has been measured yet, so it only feeds the factors
            # (the refresh after it installs their eigenbasis) and starts no moment. An Adam
            # step in the identity basis here would leave a second moment measured in the wrong
            # basis for the first eigenbasis steps. The moments are created (zero, with no
            # update counted) all the same, so that the state after one step has every entry
            # of a trained one: a checkpoint template built from one step can hold them.
            self._start_moments(state, gradient)
            return torch.zeros_like(gradient)
        identity_basis_unless_refreshed(state, filtered)
        self._start_moments(state, gradient)
        state["correction_step"] += 1
        basis = self.eigenbasis(state)
        rotated_gradient = basis.to_eigenbasis(gradient)
        update_second_moment_(state["second_moment"], rotated_gradient, settings.beta2)
        if self.filters_in_eigenbasis:  # ``filtered`` is the raw gradient here
            numerator, _ = momentum_numerator(
                state, rotated_gradient, settings, "eigenbasis_momentum"
            )
            # the moment started with the second moment (not at the measuring first step)
            momentum_correction = (
                1.0
                if settings.beta1 == 0.0
                else bias_correction(
                    settings.beta1, state["correction_step"], settings.bias_correction
                )
            )
        else:
            numerator, momentum_correction = basis.to_eigenbasis(filtered), 1.0
        # Adam's quotient overwrites the rotated gradient (read for the last time above) unless
        # that is the numerator itself (β₁ = 0); both bias corrections become the scale of the
        # rotation back, which folds it into a GEMM: 6 elementwise passes, no temporaries.
        quotient = (
            torch.empty_like(numerator) if numerator is rotated_gradient else rotated_gradient
        )
        scale = adam_quotient_(
            quotient,
            numerator,
            state["second_moment"],
            self.eigenvalue_correction(state),
            settings.epsilon,
        )
        return basis.from_eigenbasis(quotient, scale / momentum_correction)

    def _start_moments(self, state: State, gradient: torch.Tensor) -> None:
        """The zero moments of a stack that has none yet, no update counted."""
        if "second_moment" in state:
            return
        state["correction_step"] = 0
        state["second_moment"] = torch.zeros_like(gradient)
        if self.filters_in_eigenbasis and self.settings.beta1 != 0.0:
            state["eigenbasis_momentum"] = torch.zeros_like(gradient)

    def eigenbasis(self, state: State) -> KroneckerEigenbasis:
        """``Q_i`` with the second moment ``E`` as the corrected eigenvalue tensor (not
        bias-corrected: the direction divides by ``bc`` as Adam does)."""
        return KroneckerEigenbasis(tuple(state["eigenvectors"]), corrected=state["second_moment"])


@dataclass(frozen=True)
class EigenvalueCorrectedConfig:
    """EShampoo / SOAP (George et al., 2018; Vyas et al., 2024): Adam's second moment kept in
    the factors' eigenbasis. ``eigenbasis="qr"`` refreshes by one warm-started QR step (SOAP),
    ``"eigh"`` by a full decomposition. ``factor_beta`` is the factors' EMA rate (SOAP's
    ``shampoo_beta``; ``None`` = ``betas[1]``). ``second_moment_carry`` says how the second
    moment crosses a refresh: ``"follow_columns"`` (each entry stays with its eigenvector, as
    in SOAP) or ``"rotate"`` (re-expressed in the new basis by squared overlaps)."""

    eigenbasis: EigenbasisMethod = "eigh"
    factor_beta: float | None = None
    second_moment_carry: Literal["follow_columns", "rotate"] = "follow_columns"
    name: str = "eigenvalue_corrected"

    variant: ClassVar[type[ShampooVariant]] = EigenvalueCorrectedShampoo

    def __post_init__(self) -> None:
        check_choice("eigenbasis", self.eigenbasis, ("eigh", "qr"))
        check_choice("second_moment_carry", self.second_moment_carry, ("follow_columns", "rotate"))
        check_factor_beta(self.factor_beta)
