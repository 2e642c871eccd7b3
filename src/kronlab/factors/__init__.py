"""Kronecker factors: statistics, eigenbases and preconditioning shared by optimizers and
attribution."""

from kronlab.factors.damping import DAMPING_KINDS, Damping
from kronlab.factors.eigenbasis import KroneckerEigenbasis
from kronlab.factors.kronecker import (
    axis_outer_products,
    from_eigenbasis,
    kronecker_outer,
    kronecker_product_apply,
    mode_product,
    precondition_in_eigenbasis,
    to_eigenbasis,
)
from kronlab.factors.structures import (
    STRUCTURE_NAMES,
    BlockDiagonalStructure,
    DenseStructure,
    DiagonalStructure,
    MatrixStructure,
    TriangularStructure,
    make_structure,
)

__all__ = [
    "DAMPING_KINDS",
    "Damping",
    "KroneckerEigenbasis",
    "STRUCTURE_NAMES",
    "BlockDiagonalStructure",
    "DenseStructure",
    "DiagonalStructure",
    "MatrixStructure",
    "TriangularStructure",
    "make_structure",
    "axis_outer_products",
    "from_eigenbasis",
    "kronecker_outer",
    "kronecker_product_apply",
    "mode_product",
    "precondition_in_eigenbasis",
    "to_eigenbasis",
]
