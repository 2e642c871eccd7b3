"""The Shampoo variants by name, and the grafting config.

Each variant is one frozen config dataclass, defined beside its strategy in its own file and
listed in ``VARIANTS``. Pass one as
``Shampoo(..., preconditioner=EigenvalueCorrectedConfig(eigenbasis="qr"))`` or name the variant
with a string (its config with default options).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kronlab.optim.shampoo.eigendecomposed import EigendecomposedConfig
from kronlab.optim.shampoo.eigenvalue_corrected import EigenvalueCorrectedConfig
from kronlab.optim.shampoo.per_factor import PerFactorEigenvalueCorrectedConfig
from kronlab.optim.shampoo.root_inverse import RootInverseConfig
from kronlab.optim.shampoo.variant import VariantConfig
from kronlab.optim.validation import check_choice, check_range

GraftingMethod = Literal["none", "sgd", "adagrad", "rmsprop", "adam"]

# The registration of a variant: its config class, under the config's default ``name``.
VARIANTS: dict[str, type[VariantConfig]] = {
    config.name: config  # type: ignore[misc]
    for config in (
        RootInverseConfig,
        EigendecomposedConfig,
        EigenvalueCorrectedConfig,
        PerFactorEigenvalueCorrectedConfig,
    )
}
KL_VARIANTS = tuple(name for name, config in VARIANTS.items() if config.variant.supports_kl)


def resolve_preconditioner(preconditioner: object) -> VariantConfig:
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
