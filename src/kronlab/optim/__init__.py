"""Optimizers. Importing this package registers every optimizer for ``kronlab compare``."""

from kronlab.optim import baselines  # noqa: F401  (registers the torch.optim baselines)
from kronlab.optim.base import KronOptimizer
from kronlab.optim.bundles import ParameterBundle, identify_bundles
from kronlab.optim.psgd import PSGD, PSGDLayout, plan_psgd_layout
from kronlab.optim.registry import (
    RegisteredOptimizer,
    available_optimizers,
    create_optimizer,
    get_optimizer,
    register_optimizer,
)

__all__ = [
    "PSGD",
    "KronOptimizer",
    "PSGDLayout",
    "ParameterBundle",
    "RegisteredOptimizer",
    "available_optimizers",
    "create_optimizer",
    "get_optimizer",
    "identify_bundles",
    "plan_psgd_layout",
    "register_optimizer",
]
