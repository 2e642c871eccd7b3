"""Kronecker factors: statistics, eigenbases and preconditioning shared by optimizers and
attribution."""

from kronlab.factors.damping import DAMPING_KINDS, Damping
from kronlab.factors.eigenbasis import KroneckerEigenbasis
from kronlab.factors.kronecker import (
    from_eigenbasis,
    kronecker_outer,
    kronecker_product_apply,
    mode_product,
    precondition_in_eigenbasis,
    to_eigenbasis,
)

__all__ = [
    "DAMPING_KINDS",
    "Damping",
    "KroneckerEigenbasis",
    "from_eigenbasis",
    "kronecker_outer",
    "kronecker_product_apply",
    "mode_product",
    "precondition_in_eigenbasis",
    "to_eigenbasis",
]
