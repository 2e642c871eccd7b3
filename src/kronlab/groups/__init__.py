"""Which tensors share a preconditioner, and the shape the preconditioner sees."""

from kronlab.groups.layout import (
    BlockLayout,
    drop_unit_dims,
    merge_small_dims,
    most_square_shape,
    plan_layout,
)
from kronlab.groups.rules import (
    FlattenEmbedding,
    LinearWeightBias,
    PerParameter,
    PreconditionerGroup,
    check_rules,
)

__all__ = [
    "BlockLayout",
    "FlattenEmbedding",
    "LinearWeightBias",
    "PerParameter",
    "PreconditionerGroup",
    "check_rules",
    "drop_unit_dims",
    "merge_small_dims",
    "most_square_shape",
    "plan_layout",
]
