"""The Shampoo family: root-inverse, eigendecomposed, eigenvalue-corrected (SOAP/EShampoo),
per-factor eigenvalue-corrected, and KL-Shampoo, in one optimizer."""

from kronlab.optim.shampoo import registration  # noqa: F401  (registers for kronlab compare)
from kronlab.optim.shampoo.config import (
    EigendecomposedConfig,
    EigenvalueCorrectedConfig,
    GraftingConfig,
    PerFactorEigenvalueCorrectedConfig,
    RootInverseConfig,
)
from kronlab.optim.shampoo.optimizer import KroneckerBlock, Shampoo
from kronlab.optim.shampoo.presets import SOAP, KLShampoo

__all__ = [
    "SOAP",
    "EigendecomposedConfig",
    "EigenvalueCorrectedConfig",
    "GraftingConfig",
    "KLShampoo",
    "KroneckerBlock",
    "PerFactorEigenvalueCorrectedConfig",
    "RootInverseConfig",
    "Shampoo",
]
