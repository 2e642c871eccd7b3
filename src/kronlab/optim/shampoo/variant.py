"""What every Shampoo variant answers: its state, its refresh and its direction.

A variant is a config dataclass (what the user picks, validated at construction) naming its
``ShampooVariant`` class, built for one stack's hyperparameters by ``StackSettings.variant()``.
The optimizer does the shared work (momentum, grafting, factor statistics, batched
decompositions, the update) and asks the variant only what differs; each variant lives in one
file with its config (``root_inverse.py``, ``eigendecomposed.py``, ``eigenvalue_corrected.py``,
``per_factor.py``) and is registered by name in ``config.VARIANTS``.

Per-stack state written by the variants (lists have one entry per block axis, stacks B blocks):
``refreshes`` (decompositions so far, the QR refresh's warm start needs one) and the variant's
cache, described in its file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, Protocol

import torch

from kronlab.factors.accumulation import bias_correction
from kronlab.factors.damping import Damping
from kronlab.factors.eigenbasis import KroneckerEigenbasis
from kronlab.optim.shampoo.settings import StackSettings
from kronlab.optim.validation import check_choice, check_range

State = dict[str, Any]
EigenbasisMethod = Literal["eigh", "qr"]


class VariantConfig(Protocol):
    """The config dataclass of a variant: its name, how a refresh decomposes, its strategy."""

    name: str
    eigenbasis: EigenbasisMethod
    variant: ClassVar[type[ShampooVariant]]


class Refreshed(NamedTuple):
    """A stack's refreshed decomposition, per block axis: eigenvalues ``(B, d_i)``,
    eigenvectors ``(B, d_i, d_i)``, ``ok`` ``(B,)`` (``False`` where the refresh failed and the
    previous decomposition was kept) and ``orders`` ``(B, d_i)`` (the old column each new one
    continues)."""

    eigenvalues: list[torch.Tensor]
    eigenvectors: list[torch.Tensor]
    ok: list[torch.Tensor]
    orders: list[torch.Tensor]


class StepInputs(NamedTuple):
    """What a direction is made from, in the factor dtype: the stack's gradient, the filtered
    gradient (``M``, or its numerator: every variant is linear in it) and this step's outer
    products (empty unless the variant ``reads_outer_products``)."""

    gradient: torch.Tensor
    filtered: torch.Tensor
    products: Sequence[torch.Tensor]


@dataclass(frozen=True)
class InverseRootOptions:
    """Options of the variants that precondition by ``F^{-p}``: ``exponent_override`` replaces
    ``p = 1/(2k)``; ``eigenbasis`` is how a refresh decomposes a factor (``"eigh"``, or one
    warm-started QR power step from the previous basis, whose Rayleigh quotients serve as
    eigenvalues: approximate, and the first refresh is an eigh)."""

    exponent_override: float | None = None
    eigenbasis: EigenbasisMethod = "eigh"

    def __post_init__(self) -> None:
        if self.exponent_override is not None:
            check_range("exponent_override", self.exponent_override, 0.0, low_inclusive=False)
        check_choice("eigenbasis", self.eigenbasis, ("eigh", "qr"))


def check_factor_beta(factor_beta: float | None) -> None:
    """``factor_beta``: ``None`` (the optimizer's ``betas[1]``) or a rate in [0, 1]."""
    if factor_beta is not None:
        check_range("factor_beta", factor_beta, 0.0, 1.0)


class ShampooVariant:
    """One stack's Shampoo variant (Gupta et al., 2018): the shared defaults, overridden per file.

    Its attributes say how the shared pipeline treats the variant: ``refresh_after_step``
    (decompose after the direction, SOAP's order: a basis never contains the gradient it
    measures), ``tracks_columns`` (a refresh must say which old column each new one continues,
    for per-column estimates), ``reads_outer_products`` (the direction needs this step's
    ``O_t``), ``filters_in_eigenbasis`` (the first moment is kept in the eigenbasis, so the
    optimizer passes the raw gradient), ``supports_kl`` (KL-Shampoo's statistics can take this
    variant's inverse square roots) and ``exported_eigenvalues`` (the state entry that
    ``Shampoo.kronecker_factors`` exports as eigenvalues).
    """

    refresh_after_step: bool = False
    tracks_columns: bool = False
    reads_outer_products: bool = False
    filters_in_eigenbasis: bool = False
    supports_kl: ClassVar[bool] = False
    exported_eigenvalues: ClassVar[str] = "eigenvalues"

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.config: Any = settings.preconditioner

    # --- hyperparameters ------------------------------------------------------------------
    @property
    def factor_beta(self) -> float:
        """EMA rate of the Kronecker factors."""
        return self.settings.beta2

    def exponent(self, num_factors: int) -> float:
        """``p`` in ``F^{-p}``: 1/2 for KL-Shampoo, else ``1/(2k)``."""
        return inverse_exponent(None, self.settings.kl, num_factors)

    @property
    def damping(self) -> Damping:
        """Shampoo's ``ε``, added to each factor's bias-corrected eigenvalues."""
        return Damping("per_factor_absolute", self.settings.epsilon)

    def factor_correction(self, state: State) -> float:
        """Bias correction of the factors, ``1 − β_F^t``."""
        return bias_correction(self.factor_beta, state["step"], self.settings.bias_correction)

    def eigenvalue_correction(self, state: State) -> float:
        """Bias correction of an eigenvalue EMA, ``1 − β₂^c`` after ``c`` corrections."""
        return bias_correction(
            self.settings.beta2, state.get("correction_step", 0), self.settings.bias_correction
        )

    def eigenbasis(self, state: State) -> KroneckerEigenbasis | None:
        """The variant's cache as one ``KroneckerEigenbasis`` of views into its state, with
        bias-corrected eigenvalues (``None``: the variant caches no eigenbasis)."""
        return None

    # --- refresh --------------------------------------------------------------------------
    def is_refresh_step(self, step: int) -> bool:
        """Refresh at the first preconditioned step, then every ``precondition_frequency``."""
        start = self.settings.start_preconditioning_step
        if step < start:  # may be inf: grafting alone
            return False
        return (step - int(start)) % self.settings.precondition_frequency == 0

    def refresh_method(self, state: State) -> EigenbasisMethod:
        """``"qr"`` only when configured and a previous refresh exists to warm-start from."""
        return "qr" if self.config.eigenbasis == "qr" and state.get("refreshes", 0) > 0 else "eigh"

    def previous_eigenpairs(
        self, state: State, axis: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The decomposition a failed refresh falls back to (``None`` before the first)."""
        vectors = state["eigenvectors"][axis] if "eigenvectors" in state else None
        values = state["eigenvalues"][axis] if "eigenvalues" in state else None
        return vectors, values

    def install(self, state: State, refreshed: Refreshed) -> None:
        """Count the refresh and keep its decomposition the way the variant uses it."""
        state["refreshes"] = state.get("refreshes", 0) + 1
        self.store(state, refreshed)

    def store(self, state: State, refreshed: Refreshed) -> None:
        raise NotImplementedError

    # --- statistics and direction ---------------------------------------------------------
    def inverse_sqrts(self, state: State) -> list[torch.Tensor] | None:
        """``F_j^{-1/2}`` per axis for KL-Shampoo's statistics (``None``: none yet)."""
        return None

    def measure(
        self, state: State, gradient: torch.Tensor, products: Sequence[torch.Tensor]
    ) -> None:
        """Update estimates that follow the factor statistics (before any refresh)."""

    def direction(self, state: State, inputs: StepInputs) -> torch.Tensor:
        """The preconditioned direction of ``inputs.filtered``."""
        raise NotImplementedError


def inverse_exponent(override: float | None, kl: bool, num_factors: int) -> float:
    """``p`` in ``F^{-p}``: the override, 1/2 for KL-Shampoo, else ``1/(2k)``."""
    if override is not None:
        return override
    return 0.5 if kl else 1.0 / (2 * num_factors)


def identity_basis_unless_refreshed(state: State, like: torch.Tensor) -> list[torch.Tensor]:
    """The stack's eigenvectors, the identity basis (stored) before the first refresh."""
    if "eigenvectors" not in state:
        state["eigenvectors"] = [
            torch.eye(size, dtype=like.dtype, device=like.device).repeat(len(like), 1, 1)
            for size in like.shape[1:]
        ]
    return state["eigenvectors"]


def corrected_spectra(
    eigenvectors: Sequence[torch.Tensor], eigenvalues: Sequence[torch.Tensor], correction: float
) -> KroneckerEigenbasis:
    """``Q_i`` with the factor spectra ``λ_i / correction`` (a bias correction)."""
    scale = 1.0 / correction
    return KroneckerEigenbasis(tuple(eigenvectors), tuple(values * scale for values in eigenvalues))
