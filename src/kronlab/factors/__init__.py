"""Kronecker factors: statistics, eigenbases and preconditioning shared by optimizers and
attribution."""

from kronlab.factors.kronecker import (
    axis_outer_products,
    from_eigenbasis,
    kronecker_outer,
    kronecker_product_apply,
    mode_product,
    precondition_in_eigenbasis,
    to_eigenbasis,
)

__all__ = [
    "axis_outer_products",
    "from_eigenbasis",
    "kronecker_outer",
    "kronecker_product_apply",
    "mode_product",
    "precondition_in_eigenbasis",
    "to_eigenbasis",
]
