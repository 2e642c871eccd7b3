"""Distributed Shampoo's (``distributed_shampoo``) names over ``kronlab.optim.Shampoo``.

``DistributedShampoo(params, ..., preconditioner_config=..., grafting_config=...)`` with its
config dataclasses, mapped onto kronlab's variant configs. The per-factor configs run the
per-factor eigenvalue correction in the pull request's order (``step_order="distributed_shampoo"``).
Options kronlab does not implement (SGD momentum on top of the search direction, ``beta3``,
distributed configs) are accepted at their defaults and refused with ``ValueError`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kronlab.optim.base import ParamsT
from kronlab.optim.shampoo import (
    EigendecomposedConfig,
    EigenvalueCorrectedConfig,
    GraftingConfig,
    PerFactorEigenvalueCorrectedConfig,
    RootInverseConfig,
    Shampoo,
)
from kronlab.optim.validation import check_range


@dataclass(frozen=True)
class EigenConfig:
    """Amortized computation by a symmetric eigendecomposition (``torch.linalg.eigh``)."""


@dataclass(frozen=True)
class QREigendecompositionConfig:
    """Amortized computation by one warm-started QR power step from the previous basis (SOAP)."""


EighEigendecompositionConfig = EigenConfig
DefaultEigenConfig = EigenConfig()
DefaultEigendecompositionConfig = EigenConfig()


@dataclass(kw_only=True)
class _PreconditionerConfig:
    amortized_computation_config: EigenConfig | QREigendecompositionConfig = DefaultEigenConfig
    num_tolerated_failed_amortized_computations: int = 3
    factor_matrix_dtype: torch.dtype = torch.float32
    inverse_exponent_override: dict[int, dict[int, float] | float] = field(default_factory=dict)
    kl = False

    def __post_init__(self) -> None:
        check_range(
            "num_tolerated_failed_amortized_computations",
            self.num_tolerated_failed_amortized_computations,
            0,
            integer=True,
        )
        for order, override in self.inverse_exponent_override.items():
            values = set(override.values()) if isinstance(override, dict) else {override}
            if len(values) > 1 or (isinstance(override, dict) and len(override) != order):
                raise ValueError(
                    f"Invalid inverse_exponent_override[{order}]: {override!r} (allowed: one "
                    "exponent for every dimension of an order, as a float or a full dict)"
                )
            check_range(
                f"inverse_exponent_override[{order}]", values.pop(), 0.0, low_inclusive=False
            )

    def eigenbasis(self) -> str:
        return (
            "qr"
            if isinstance(self.amortized_computation_config, QREigendecompositionConfig)
            else "eigh"
        )

    def exponent(self, order: int) -> float | None:
        override = self.inverse_exponent_override.get(order)
        if isinstance(override, dict):
            return next(iter(override.values()))
        return override

    def kronlab_config(self, order: int) -> Any:
        raise NotImplementedError


@dataclass(kw_only=True)
class RootInvShampooPreconditionerConfig(_PreconditionerConfig):
    """Shampoo with cached inverse roots ``(F/bc + εI)^{-1/(2·order)}``."""

    def kronlab_config(self, order: int) -> Any:
        return RootInverseConfig(self.exponent(order), self.eigenbasis())  # type: ignore[arg-type]


@dataclass(kw_only=True)
class EigendecomposedShampooPreconditionerConfig(_PreconditionerConfig):
    """Shampoo with cached eigenpairs of each factor."""

    def kronlab_config(self, order: int) -> Any:
        return EigendecomposedConfig(self.exponent(order), self.eigenbasis())  # type: ignore[arg-type]


@dataclass(kw_only=True)
class EigenvalueCorrectedShampooPreconditionerConfig(_PreconditionerConfig):
    """Eigenvalue-corrected Shampoo (EShampoo; SOAP with ``QREigendecompositionConfig``)."""

    def kronlab_config(self, order: int) -> Any:
        if self.inverse_exponent_override:
            raise ValueError(
                f"Invalid inverse_exponent_override: {self.inverse_exponent_override!r} "
                "(allowed: {} for the eigenvalue-corrected variant)"
            )
        return EigenvalueCorrectedConfig(eigenbasis=self.eigenbasis())  # type: ignore[arg-type]


@dataclass(kw_only=True)
class PerFactorEigenvalueCorrectedShampooPreconditionerConfig(_PreconditionerConfig):
    """m+n eigenvalues per block, ``E_k ← β₂ E_k + (1 − β₂) diag(Q_kᵀ O_t Q_k)`` (PR #264 order)."""

    def kronlab_config(self, order: int) -> Any:
        return PerFactorEigenvalueCorrectedConfig(
            self.exponent(order),
            self.eigenbasis(),
            step_order="distributed_shampoo",  # type: ignore[arg-type]
        )


@dataclass(kw_only=True)
class RootInvKLShampooPreconditionerConfig(RootInvShampooPreconditionerConfig):
    """KL-Shampoo with cached inverse roots."""

    kl = True


@dataclass(kw_only=True)
class EigendecomposedKLShampooPreconditionerConfig(EigendecomposedShampooPreconditionerConfig):
    """KL-Shampoo with cached eigenpairs."""

    kl = True


@dataclass(kw_only=True)
class PerFactorEigenvalueCorrectedKLShampooPreconditionerConfig(
    PerFactorEigenvalueCorrectedShampooPreconditionerConfig
):
    """KL-Shampoo whose factor inverses come from the per-factor eigenvalue EMA."""

    kl = True


DefaultShampooConfig = RootInvShampooPreconditionerConfig()
DefaultEigenvalueCorrectedShampooConfig = EigenvalueCorrectedShampooPreconditionerConfig()
DefaultSOAPConfig = EigenvalueCorrectedShampooPreconditionerConfig(
    amortized_computation_config=QREigendecompositionConfig()
)


@dataclass(frozen=True)
class SGDGraftingConfig:
    """Graft the norm of the (filtered) gradient."""

    def kronlab_grafting(self) -> GraftingConfig:
        return GraftingConfig("sgd")


@dataclass(frozen=True)
class AdaGradGraftingConfig:
    """Graft the norm of AdaGrad's direction ``M / (√Σg² + ε)``."""

    epsilon: float = 1e-10

    def kronlab_grafting(self) -> GraftingConfig:
        return GraftingConfig("adagrad", epsilon=self.epsilon)


@dataclass(frozen=True)
class RMSpropGraftingConfig:
    """Graft the norm of RMSprop's direction ``M / (√v + ε)``."""

    beta2: float = 0.99
    epsilon: float = 1e-8

    def kronlab_grafting(self) -> GraftingConfig:
        return GraftingConfig("rmsprop", beta2=self.beta2, epsilon=self.epsilon)


@dataclass(frozen=True)
class AdamGraftingConfig:
    """Graft the norm of Adam's direction ``M / (√(v/bc₂) + ε)``."""

    beta2: float = 0.999
    epsilon: float = 1e-8

    def kronlab_grafting(self) -> GraftingConfig:
        return GraftingConfig("adam", beta2=self.beta2, epsilon=self.epsilon)


# Later Distributed Shampoo releases name the grafting configs after their preconditioners.
SGDPreconditionerConfig = SGDGraftingConfig
AdaGradPreconditionerConfig = AdaGradGraftingConfig
RMSpropPreconditionerConfig = RMSpropGraftingConfig
AdamPreconditionerConfig = AdamGraftingConfig


class DistributedShampoo(Shampoo):
    """Distributed Shampoo's constructor (Shi et al., 2023) on ``kronlab.optim.Shampoo``.

    Args:
        params: parameters or param groups.
        lr, betas, epsilon, weight_decay: as in Distributed Shampoo (``betas[1] = 1`` sums the
            factors, AdaGrad-style).
        beta3: ``-1`` (= ``betas[0]``) only.
        momentum, dampening, use_nesterov: SGD momentum on the search direction; ``0``/``False``
            only (use ``betas[0]`` for the filtered gradient).
        max_preconditioner_dim: blocks larger dims into pieces of at most this size.
        precondition_frequency: steps between amortized computations.
        start_preconditioning_step: the first preconditioned step (``-1``: the frequency);
            earlier steps take the grafting direction.
        use_bias_correction, use_decoupled_weight_decay: as named.
        grafting_config: ``None`` or one of the grafting configs above.
        use_pin_memory, shampoo_pt2_compile_config: accepted and ignored (host-side options).
        distributed_config: ``None`` only (kronlab runs data-parallel through DDP).
        preconditioner_config: one of the preconditioner configs above.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 1.0),
        beta3: float = -1.0,
        epsilon: float = 1e-12,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        max_preconditioner_dim: int | float = 1024,
        precondition_frequency: int = 1,
        start_preconditioning_step: int = -1,
        use_nesterov: bool = False,
        use_bias_correction: bool = True,
        use_decoupled_weight_decay: bool = True,
        grafting_config: Any = None,
        use_pin_memory: bool = False,
        shampoo_pt2_compile_config: Any = None,
        distributed_config: Any = None,
        preconditioner_config: _PreconditionerConfig = DefaultShampooConfig,
    ) -> None:
        for name, value, allowed in (
            ("beta3", beta3, -1.0),
            ("momentum", momentum, 0.0),
            ("dampening", dampening, 0.0),
            ("use_nesterov", use_nesterov, False),
            ("distributed_config", distributed_config, None),
        ):
            if value != allowed:
                raise ValueError(
                    f"Invalid {name}: {value!r} (allowed: {allowed!r}; not supported on kronlab)"
                )
        if not isinstance(preconditioner_config, _PreconditionerConfig):
            raise ValueError(
                f"Invalid preconditioner_config: {preconditioner_config!r} (allowed: a "
                "preconditioner config from kronlab.compat.distributed_shampoo)"
            )
        if start_preconditioning_step == -1:
            start_preconditioning_step = precondition_frequency
        self.preconditioner_config = preconditioner_config
        super().__init__(
            _groups_by_order(params, preconditioner_config),
            lr,
            betas,
            epsilon,
            preconditioner=preconditioner_config.kronlab_config(0),
            kl=preconditioner_config.kl,
            grafting="none" if grafting_config is None else grafting_config.kronlab_grafting(),
            weight_decay=weight_decay,
            decoupled_weight_decay=use_decoupled_weight_decay,
            bias_correction=use_bias_correction,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            max_preconditioner_dim=None
            if max_preconditioner_dim == float("inf")
            else int(max_preconditioner_dim),
            factor_dtype=preconditioner_config.factor_matrix_dtype,
            vector_preconditioner="dense",
            max_consecutive_failures=preconditioner_config.num_tolerated_failed_amortized_computations
            + 1,
        )


def _groups_by_order(params: ParamsT, config: _PreconditionerConfig) -> Any:
    """Param groups split by tensor order where ``inverse_exponent_override`` names orders, each
    with its order's variant config (kronlab's exponent is per group, Distributed Shampoo's per
    order)."""
    if not config.inverse_exponent_override or params is None:
        return params
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    split = []
    for group in groups:
        members = (
            [group["params"]] if isinstance(group["params"], torch.Tensor) else group["params"]
        )
        for order in sorted({p.ndim for p in members}):
            split.append(
                {
                    **group,
                    "params": [p for p in members if p.ndim == order],
                    "preconditioner": config.kronlab_config(order),
                }
            )
    return split
