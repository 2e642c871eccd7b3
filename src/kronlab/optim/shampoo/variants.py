"""What each Shampoo variant caches at a refresh and how it turns the filtered gradient into a
direction. Everything else (statistics, refresh scheduling, grafting) is shared.

Per-stack state written here (lists have one entry per block axis, stacks have B blocks):

* root-inverse: ``inverse_roots`` ``[(B, d_i, d_i)]`` = ``(F_i/bc + εI)^{-p}`` at the last refresh.
* eigendecomposed: ``eigenvectors`` ``[(B, d_i, d_i)]``, ``eigenvalues`` ``[(B, d_i)]`` of ``F_i``.
* eigenvalue-corrected: ``eigenvectors``, ``second_moment`` ``(B, d_1, …, d_k)``, and
  ``correction_step`` (updates of the second moment, for its bias correction); without
  grafting, also ``eigenbasis_momentum`` (the first moment kept in the eigenbasis, see
  ``momentum_in_eigenbasis``) instead of the parameter-space ``momentum``.
* per-factor eigenvalue-corrected: ``eigenvectors``, ``eigenvalue_ema`` ``[(B, d_i)]``,
  ``correction_step``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kronlab.factors.accumulation import bias_correction
from kronlab.factors.correction import (
    follow_columns,
    transport_second_moment,
    update_factor_eigenvalues_,
    update_second_moment_,
)
from kronlab.factors.inverse import (
    damped_inverse_root,
    damped_inverse_root_,
    damped_inverse_root_scales,
)
from kronlab.factors.kronecker import (
    from_eigenbasis,
    kronecker_outer,
    kronecker_product_apply,
    precondition_in_eigenbasis,
    to_eigenbasis,
)
from kronlab.optim.shampoo.config import (
    EigendecomposedConfig,
    EigenvalueCorrectedConfig,
    PerFactorEigenvalueCorrectedConfig,
    RootInverseConfig,
)
from kronlab.optim.shampoo.moments import adam_quotient_, momentum_numerator
from kronlab.optim.shampoo.settings import StackSettings

State = dict[str, Any]


def factor_correction(state: State, settings: StackSettings) -> float:
    return bias_correction(settings.factor_beta, state["step"], settings.bias_correction)


def eigenvalue_correction(state: State, settings: StackSettings) -> float:
    return bias_correction(settings.beta2, state["correction_step"], settings.bias_correction)


def refresh_method(state: State, settings: StackSettings) -> str:
    """``"qr"`` only when configured and a previous refresh exists to warm-start from."""
    wants_qr = getattr(settings.preconditioner, "eigenbasis", "eigh") == "qr"
    return "qr" if wants_qr and state.get("refreshes", 0) > 0 else "eigh"


def tracks_columns(settings: StackSettings) -> bool:
    """Whether a refresh must say which old column each new one continues (``order``).

    The eigenvalue-corrected variants carry per-column estimates across a refresh;
    root-inverse and eigendecomposed Shampoo keep nothing per column, which saves eigh's
    ranking product ``F Q_old`` per factor.
    """
    return (
        isinstance(
            settings.preconditioner,
            (EigenvalueCorrectedConfig, PerFactorEigenvalueCorrectedConfig),
        )
        and not settings.distributed_shampoo_order
    )


def reads_outer_products(settings: StackSettings) -> bool:
    """Whether the direction needs this step's outer products ``O_t`` (the per-factor EMA)."""
    return isinstance(settings.preconditioner, PerFactorEigenvalueCorrectedConfig)


def momentum_in_eigenbasis(settings: StackSettings) -> bool:
    """Whether a Kronecker stack keeps its first moment in the eigenbasis, ``M̃ = M ×_i Q_iᵀ``.

    Exact (the rotation is linear and the basis only changes at refreshes, where ``M̃`` is
    carried over by ``Q_newᵀ Q_old``) and saves rotating the momentum every step: 2k instead of
    4k block products. Only for the eigenvalue-corrected variant without grafting and with
    preconditioning from the first step, since otherwise ``M`` itself is needed in parameter space.
    """
    return (
        isinstance(settings.preconditioner, EigenvalueCorrectedConfig)
        and settings.grafting.method == "none"
        and settings.start_preconditioning_step <= 1
    )


def previous_eigenpairs(state: State, axis: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The decomposition a failed refresh falls back to (``None`` before the first)."""
    vectors = state["eigenvectors"][axis] if "eigenvectors" in state else None
    values = state["eigenvalues"][axis] if "eigenvalues" in state else None
    return vectors, values


# --- install a refreshed decomposition -------------------------------------------------------
def install(
    state: State,
    settings: StackSettings,
    eigenvalues: Sequence[torch.Tensor],
    eigenvectors: Sequence[torch.Tensor],
    ok: Sequence[torch.Tensor],
    orders: Sequence[torch.Tensor],
) -> None:
    """Store a stack's refreshed decomposition the way its variant uses it.

    Corrections are never overwritten: each entry follows its eigenvector column (``orders``),
    so nothing jumps; SOAP may instead rotate its second moment into the new basis.
    """
    config = settings.preconditioner
    state["refreshes"] = state.get("refreshes", 0) + 1
    if isinstance(config, RootInverseConfig):
        exponent = settings.exponent(len(eigenvalues))
        scale = 1.0 / factor_correction(state, settings)
        roots = []
        # Without a QR warm start the eigenvectors are a refresh's temporaries: the root is
        # formed in their memory.
        form_root = damped_inverse_root if config.eigenbasis == "qr" else damped_inverse_root_
        for axis, (values, vectors, good) in enumerate(zip(eigenvalues, eigenvectors, ok)):
            root = form_root(values, vectors, settings.epsilon, exponent, scale)
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
        if config.eigenbasis == "qr":  # the next refresh's warm start
            state["eigenvectors"] = list(eigenvectors)
        return
    if isinstance(config, EigendecomposedConfig):
        state["eigenvalues"] = list(eigenvalues)
    elif isinstance(config, EigenvalueCorrectedConfig) and "eigenvectors" in state:
        if "eigenbasis_momentum" in state:
            # M̃_new = M̃_old ×_i (Q_new,iᵀ Q_old,i), computed as back to parameter space and
            # into the new basis: 2k block products, never more work than forming the k
            # d_i×d_i overlaps and applying them (for m×n: 2mn(m+n) vs m³ + n³ + mn(m+n)).
            state["eigenbasis_momentum"] = to_eigenbasis(
                from_eigenbasis(state["eigenbasis_momentum"], state["eigenvectors"]),
                eigenvectors,
            )
        if config.second_moment_carry == "rotate":
            state["second_moment"] = transport_second_moment(
                state["second_moment"], eigenvectors, state["eigenvectors"]
            )
        else:
            state["second_moment"] = follow_columns(state["second_moment"], orders)
    elif (
        isinstance(config, PerFactorEigenvalueCorrectedConfig)
        and "eigenvectors" in state
        and not settings.distributed_shampoo_order
    ):
        state["eigenvalue_ema"] = [
            follow_columns(ema, [order]) for ema, order in zip(state["eigenvalue_ema"], orders)
        ]
    state["eigenvectors"] = list(eigenvectors)


# --- KL-Shampoo: the (stale) inverse square roots used in the statistics ----------------------
def kl_inverse_sqrts(
    state: State, settings: StackSettings, num_factors: int
) -> list[torch.Tensor | None] | None:
    """``F_j^{-1/2}`` per axis for KL-Shampoo's statistics; ``None`` for plain Shampoo.

    Before the first refresh (or while per-factor eigenvalues are still zero) there is no inverse
    yet and the entries are ``None`` (the gradient is used unpreconditioned).
    """
    if not settings.kl:
        return None
    config = settings.preconditioner
    if isinstance(config, RootInverseConfig) and "inverse_roots" in state:
        return list(state["inverse_roots"])
    if isinstance(config, EigendecomposedConfig) and "eigenvalues" in state:
        scale = 1.0 / factor_correction(state, settings)
        return _kl_roots(state["eigenvalues"], state["eigenvectors"], settings.epsilon, scale)
    if isinstance(config, PerFactorEigenvalueCorrectedConfig) and state.get("correction_step"):
        scale = 1.0 / eigenvalue_correction(state, settings)
        return _kl_roots(state["eigenvalue_ema"], state["eigenvectors"], settings.epsilon, scale)
    return [None] * num_factors


def _kl_roots(
    eigenvalues: Sequence[torch.Tensor],
    eigenvectors: Sequence[torch.Tensor],
    epsilon: float,
    scale: float,
) -> list[torch.Tensor]:
    """``(Q diag(λ·scale + ε) Qᵀ)^{-1/2}`` per axis, the identity for blocks whose eigenvalues
    are all zero (e.g. after an all-zero gradient): ``ε^{-1/2}`` there would multiply the next
    outer product by ``1/ε`` and the EMA would carry it (Distributed Shampoo skips the same)."""
    roots = []
    for values, vectors in zip(eigenvalues, eigenvectors):
        root = damped_inverse_root(values, vectors, epsilon, 0.5, scale)
        unmeasured = (values == 0).all(dim=-1)[..., None, None]
        identity = torch.eye(root.shape[-1], dtype=root.dtype, device=root.device)
        roots.append(torch.where(unmeasured, identity, root))
    return roots


# --- eigenvalue correction and direction ---------------------------------------------------
def correct_and_precondition(
    state: State,
    settings: StackSettings,
    gradient: torch.Tensor,
    filtered: torch.Tensor,
    products: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Update the variant's eigenvalue correction (if any) and return the direction.

    root-inverse: ``M ×_i P_i``; eigendecomposed: ``Q[(QᵀM) ⊙ ⊗(λ_i/bc + ε)^{-p}]Qᵀ``;
    eigenvalue-corrected: ``Q[(QᵀM) / (√(E/bc) + ε)]Qᵀ``; per-factor: ``Q[(QᵀM) ⊙
    ⊗(E_k/bc + ε)^{-p}]Qᵀ``.
    """
    config = settings.preconditioner
    k = filtered.ndim - 1
    if isinstance(config, RootInverseConfig):
        return kronecker_product_apply(filtered, state["inverse_roots"])
    if isinstance(config, EigendecomposedConfig):
        scale = 1.0 / factor_correction(state, settings)
        scalings = [
            damped_inverse_root_scales(values, settings.epsilon, settings.exponent(k), scale)
            for values in state["eigenvalues"]
        ]
        return precondition_in_eigenbasis(
            filtered, state["eigenvectors"], kronecker_outer(scalings)
        )
    if "eigenvectors" not in state and momentum_in_eigenbasis(settings):
        # SOAP's first step: no basis has been measured yet, so it only feeds the factors (the
        # refresh after it installs their eigenbasis) and starts no moment. An Adam step in the
        # identity basis here would leave a second moment measured in the wrong basis for the
        # first eigenbasis steps.
        return torch.zeros_like(gradient)
    eigenvectors = _identity_basis_unless_refreshed(state, filtered)
    if settings.distributed_shampoo_order:  # ``E_k`` was updated with the statistics
        return _per_factor_direction(state, settings, filtered, eigenvectors)
    state["correction_step"] = state.get("correction_step", 0) + 1
    if isinstance(config, EigenvalueCorrectedConfig):
        if "second_moment" not in state:
            state["second_moment"] = torch.zeros_like(gradient)
        rotated_gradient = to_eigenbasis(gradient, eigenvectors)
        update_second_moment_(state["second_moment"], rotated_gradient, settings.beta2)
        if momentum_in_eigenbasis(settings):  # ``filtered`` is the raw gradient here
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
            numerator, momentum_correction = to_eigenbasis(filtered, eigenvectors), 1.0
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
            eigenvalue_correction(state, settings),
            settings.epsilon,
        )
        return from_eigenbasis(quotient, eigenvectors, scale / momentum_correction)
    _accumulate_eigenvalues(state, settings, eigenvectors, products)
    return _per_factor_direction(state, settings, filtered, eigenvectors)


def update_eigenvalue_ema(
    state: State, settings: StackSettings, gradient: torch.Tensor, products: Sequence[torch.Tensor]
) -> None:
    """Distributed Shampoo's order: ``E_k`` measured on this step's outer products in the current
    basis (the identity before the first refresh), every step, before any refresh."""
    if settings.distributed_shampoo_order:
        state["correction_step"] = state.get("correction_step", 0) + 1
        eigenvectors = _identity_basis_unless_refreshed(state, gradient)
        _accumulate_eigenvalues(state, settings, eigenvectors, products)


def _identity_basis_unless_refreshed(state: State, like: torch.Tensor) -> list[torch.Tensor]:
    if "eigenvectors" not in state:  # before the first refresh: the identity basis
        state["eigenvectors"] = [
            torch.eye(size, dtype=like.dtype, device=like.device).repeat(len(like), 1, 1)
            for size in like.shape[1:]
        ]
    return state["eigenvectors"]


def _accumulate_eigenvalues(
    state: State,
    settings: StackSettings,
    eigenvectors: Sequence[torch.Tensor],
    products: Sequence[torch.Tensor],
) -> None:
    if "eigenvalue_ema" not in state:
        state["eigenvalue_ema"] = [torch.zeros_like(product[..., 0]) for product in products]
    for ema, vectors, product in zip(state["eigenvalue_ema"], eigenvectors, products):
        update_factor_eigenvalues_(ema, vectors, product, settings.beta2)


def _per_factor_direction(
    state: State, settings: StackSettings, filtered: torch.Tensor, eigenvectors: list[torch.Tensor]
) -> torch.Tensor:
    """``Q[(QᵀM) ⊙ ⊗(E_k/bc + ε)^{-p}]Qᵀ``."""
    k = filtered.ndim - 1
    scale = 1.0 / eigenvalue_correction(state, settings)
    scalings = [
        damped_inverse_root_scales(ema, settings.epsilon, settings.exponent(k), scale)
        for ema in state["eigenvalue_ema"]
    ]
    return precondition_in_eigenbasis(filtered, eigenvectors, kronecker_outer(scalings))
