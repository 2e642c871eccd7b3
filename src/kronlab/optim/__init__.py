"""Optimizers. Importing this package registers every optimizer for ``kronlab compare``."""

from kronlab.optim import baselines  # noqa: F401  (registers the torch.optim baselines)
from kronlab.optim.base import KronOptimizer
from kronlab.optim.bundles import ParameterBundle, identify_bundles
from kronlab.optim.registry import (
    RegisteredOptimizer,
    available_optimizers,
    create_optimizer,
    get_optimizer,
    register_optimizer,
)
from kronlab.optim.shampoo import SOAP, KLShampoo, Shampoo
from kronlab.optim.sirfshampoo import SIRFShampoo

__all__ = [
    "SOAP",
    "KLShampoo",
    "Shampoo",
    "KronOptimizer",
    "ParameterBundle",
    "RegisteredOptimizer",
    "SIRFShampoo",
    "available_optimizers",
    "create_optimizer",
    "get_optimizer",
    "identify_bundles",
    "register_optimizer",
]
