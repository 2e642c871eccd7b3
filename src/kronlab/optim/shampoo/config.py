"""One frozen dataclass per Shampoo variant, carrying that variant's own options.

Pass one as ``Shampoo(..., preconditioner=EigenvalueCorrectedConfig(eigenbasis="qr"))`` or name
the variant with a string (its config with default options).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kronlab.optim.validation import check_choice, check_range

GraftingMethod = Literal["none", "sgd", "adagrad", "rmsprop", "adam"]


def _check_exponent(exponent: float | None) -> None:
    if exponent is not None:
        check_range("exponent_override", exponent, 0.0, low_inclusive=False)


def _check_factor_beta(factor_beta: float | None) -> None:
    if factor_beta is not None:
        check_range("factor_beta", factor_beta, 0.0, 1.0)


@dataclass(frozen=True)
class RootInverseConfig:
    """Classic Shampoo (Gupta et al., 2018): cached ``(F/bc + εI)^{-p}`` per factor, recomputed
    every ``precondition_frequency`` steps; ``p = 1/(2k)`` for a k-factor block unless
    ``exponent_override`` is given. ``eigenbasis="qr"`` trades the exact ``eigh`` of a refresh
    for one warm-started QR power step from the previous basis, with the previous basis'
    Rayleigh quotients ``diag(Q_oldᵀ F Q_old)`` as eigenvalues (approximate; the first refresh
    is an eigh), as in Distributed Shampoo's QR-based eigendecomposition option."""

    exponent_override: float | None = None
    eigenbasis: Literal["eigh", "qr"] = "eigh"
    name: str = "root_inv"

    def __post_init__(self) -> None:
        _check_exponent(self.exponent_override)
        check_choice("eigenbasis", self.eigenbasis, ("eigh", "qr"))


@dataclass(frozen=True)
class EigendecomposedConfig:
    """Shampoo from cached eigenpairs ``F = Q Λ Qᵀ``: ``Q diag((Λ/bc + ε)^{-p}) Qᵀ`` applied with
    the current bias correction (Shi et al., 2023, Distributed Shampoo). ``eigenbasis``: as in
    ``RootInverseConfig``."""

    exponent_override: float | None = None
    eigenbasis: Literal["eigh", "qr"] = "eigh"
    name: str = "eigendecomposed"

    def __post_init__(self) -> None:
        _check_exponent(self.exponent_override)
        check_choice("eigenbasis", self.eigenbasis, ("eigh", "qr"))


@dataclass(frozen=True)
class EigenvalueCorrectedConfig:
    """EShampoo / SOAP (George et al., 2018; Vyas et al., 2024): Adam's second moment kept in
    the factors' eigenbasis. ``eigenbasis="qr"`` refreshes by one warm-started QR step (SOAP),
    ``"eigh"`` by a full decomposition. ``factor_beta`` is the factors' EMA rate (SOAP's
    ``shampoo_beta``; ``None`` = ``betas[1]``). ``second_moment_carry`` says how the second
    moment crosses a refresh: ``"follow_columns"`` (each entry stays with its eigenvector, as
    in SOAP) or ``"rotate"`` (re-expressed in the new basis by squared overlaps)."""

    eigenbasis: Literal["eigh", "qr"] = "eigh"
    factor_beta: float | None = None
    second_moment_carry: Literal["follow_columns", "rotate"] = "follow_columns"
    name: str = "eigenvalue_corrected"

    def __post_init__(self) -> None:
        check_choice("eigenbasis", self.eigenbasis, ("eigh", "qr"))
        check_choice("second_moment_carry", self.second_moment_carry, ("follow_columns", "rotate"))
        _check_factor_beta(self.factor_beta)


StepOrder = Literal["soap", "distributed_shampoo"]


@dataclass(frozen=True)
class PerFactorEigenvalueCorrectedConfig:
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

    exponent_override: float | None = None
    eigenbasis: Literal["eigh", "qr"] = "eigh"
    factor_beta: float | None = None
    step_order: StepOrder = "soap"
    name: str = "per_factor_eigenvalue_corrected"

    def __post_init__(self) -> None:
        _check_exponent(self.exponent_override)
        check_choice("eigenbasis", self.eigenbasis, ("eigh", "qr"))
        check_choice("step_order", self.step_order, ("soap", "distributed_shampoo"))
        _check_factor_beta(self.factor_beta)


PreconditionerConfig = (
    RootInverseConfig
    | EigendecomposedConfig
    | EigenvalueCorrectedConfig
    | PerFactorEigenvalueCorrectedConfig
)
VARIANTS: dict[str, type] = {
    "root_inv": RootInverseConfig,
    "eigendecomposed": EigendecomposedConfig,
    "eigenvalue_corrected": EigenvalueCorrectedConfig,
    "per_factor_eigenvalue_corrected": PerFactorEigenvalueCorrectedConfig,
}
KL_VARIANTS = ("root_inv", "eigendecomposed", "per_factor_eigenvalue_corrected")


def resolve_preconditioner(preconditioner: object) -> PreconditionerConfig:
    """A variant name or config → its config; ``ValueError`` naming the argument otherwise."""
    if isinstance(preconditioner, str):
        check_choice("preconditioner", preconditioner, tuple(VARIANTS))
        return VARIANTS[preconditioner]()
    if isinstance(preconditioner, tuple(VARIANTS.values())):
        return preconditioner  # type: ignore[return-value]
    raise ValueError(
        f"Invalid preconditioner: {preconditioner!r} (allowed: one of {list(VARIANTS)} "
        "or a config dataclass from kronlab.optim.shampoo)"
    )


@dataclass(frozen=True)
class GraftingConfig:
    """Per-block norm matching: the preconditioned direction is rescaled to the norm of this
    method's direction (Agarwal et al., 2020, "Disentangling adaptive gradient methods").
    ``beta2``/``epsilon`` of the grafting second moment (``None`` = the optimizer's ``betas[1]``;
    ``epsilon`` defaults to Adam's 1e-8)."""

    method: GraftingMethod = "adam"
    beta2: float | None = None
    epsilon: float = 1e-8

    def __post_init__(self) -> None:
        check_choice("grafting", self.method, ("none", "sgd", "adagrad", "rmsprop", "adam"))
        if self.beta2 is not None:
            check_range("grafting beta2", self.beta2, 0.0, 1.0)
        check_range("grafting epsilon", self.epsilon, 0.0, low_inclusive=False)


def resolve_grafting(grafting: object) -> GraftingConfig:
    if isinstance(grafting, GraftingConfig):
        return grafting
    if isinstance(grafting, str):
        return GraftingConfig(method=grafting)  # type: ignore[arg-type]
    raise ValueError(
        f"Invalid grafting: {grafting!r} (allowed: 'none', 'sgd', 'adagrad', 'rmsprop', 'adam' "
        "or a GraftingConfig)"
    )
