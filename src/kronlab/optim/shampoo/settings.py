"""The hyperparameters one stack of blocks is processed with, read from its param group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kronlab.optim.shampoo.config import (
    EigenvalueCorrectedConfig,
    GraftingConfig,
    PerFactorEigenvalueCorrectedConfig,
    PreconditionerConfig,
)


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
    preconditioner: PreconditionerConfig
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

    @property
    def factor_beta(self) -> float:
        """EMA rate of the Kronecker factors (SOAP's ``shampoo_beta`` where configured)."""
        own = getattr(self.preconditioner, "factor_beta", None)
        return self.beta2 if own is None else own

    def exponent(self, num_factors: int) -> float:
        """``p`` in ``F^{-p}``: the override, 1/2 for KL-Shampoo, else ``1/(2k)``."""
        override = getattr(self.preconditioner, "exponent_override", None)
        if override is not None:
            return override
        return 0.5 if self.kl else 1.0 / (2 * num_factors)

    @property
    def distributed_shampoo_order(self) -> bool:
        """Per-factor correction in Distributed Shampoo's order (``step_order``)."""
        return getattr(self.preconditioner, "step_order", "soap") == "distributed_shampoo"

    @property
    def refresh_after_step(self) -> bool:
        """Eigenvalue-corrected variants refresh their basis after the step (SOAP's order)."""
        return (
            isinstance(
                self.preconditioner,
                (EigenvalueCorrectedConfig, PerFactorEigenvalueCorrectedConfig),
            )
            and not self.distributed_shampoo_order
        )

    def is_refresh_step(self, step: int) -> bool:
        """Refresh at the first preconditioned step, then every ``precondition_frequency``
        (Distributed Shampoo's order: at steps divisible by the frequency after it)."""
        if step < self.start_preconditioning_step:  # may be inf: grafting alone
            return False
        start, frequency = int(self.start_preconditioning_step), self.precondition_frequency
        if self.distributed_shampoo_order:
            return step == start or step % frequency == 0
        return (step - start) % frequency == 0
