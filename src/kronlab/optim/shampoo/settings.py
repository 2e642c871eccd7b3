"""The hyperparameters one stack of blocks is processed with, read from its param group.

Variant-specific ones live in the variant's config (``preconditioner``), read by its strategy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kronlab.optim.shampoo.config import GraftingConfig
    from kronlab.optim.shampoo.variant import ShampooVariant, VariantConfig


@dataclass(frozen=True)
class StackSettings:
    beta1: float
    beta2: float
    epsilon: float
    nesterov: bool
    bias_correction: bool
    precondition_frequency: int
    start_preconditioning_step: float
    factor_dtype: torch.dtype
    preconditioner: VariantConfig
    grafting: GraftingConfig
    kl: bool
    max_consecutive_failures: int

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> StackSettings:
        beta1, beta2 = group["betas"]
        return cls(
            beta1=beta1,
            beta2=beta2,
            epsilon=group["eps"],
            nesterov=group["nesterov"],
            bias_correction=group["bias_correction"],
            precondition_frequency=group["precondition_frequency"],
            start_preconditioning_step=group["start_preconditioning_step"],
            factor_dtype=group["factor_dtype"],
            preconditioner=group["preconditioner"],
            grafting=group["grafting"],
            kl=group["kl"],
            max_consecutive_failures=group["max_consecutive_failures"],
        )

    def variant(self) -> ShampooVariant:
        """The strategy of this stack's preconditioner variant."""
        return self.preconditioner.variant(self)
