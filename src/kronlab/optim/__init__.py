"""Optimizers. Importing this package registers every optimizer for ``kronlab compare``."""

from kronlab.optim import baselines  # noqa: F401  (registers the torch.optim baselines)
from kronlab.optim.base import KronOptimizer
from kronlab.optim.bundles import ParameterBundle, identify_bundles
from kronlab.optim.hybrid import auxiliary_parameters, optimizer_state_bytes
from kronlab.optim.muon import Muon
from kronlab.optim.psgd import PSGD, PSGDLayout, plan_psgd_layout
from kronlab.optim.registry import (
    RegisteredOptimizer,
    available_optimizers,
    create_optimizer,
    get_optimizer,
    register_optimizer,
)
from kronlab.optim.shampoo import SOAP, KLShampoo, Shampoo
from kronlab.optim.sirfshampoo import SIRFShampoo
from kronlab.optim.spectron import Spectron

__all__ = [
    "KLShampoo",
    "KronOptimizer",
    "Muon",
    "PSGD",
    "PSGDLayout",
    "ParameterBundle",
    "RegisteredOptimizer",
    "SIRFShampoo",
    "SOAP",
    "Shampoo",
    "Spectron",
    "auxiliary_parameters",
    "available_optimizers",
    "create_optimizer",
    "get_optimizer",
    "identify_bundles",
    "optimizer_state_bytes",
    "plan_psgd_layout",
    "register_optimizer",
]
