"""Gradient compression for the attribution store: random projections and the modes that use
them (``project``, ``folded``, ``whitened``), each a :class:`CompressionStrategy`."""

from kronlab.attribution.compression import folded, project, whitened  # noqa: F401 (registers)
from kronlab.attribution.compression.base import (
    COMPRESSION_STRATEGIES,
    CompressionStrategy,
    compression_strategy,
    register_compression,
)
from kronlab.attribution.compression.projection import (
    Projection,
    factor_power_projections,
    module_projections,
    project_blocks,
    projected_side,
)

__all__ = [
    "COMPRESSION_STRATEGIES",
    "CompressionStrategy",
    "Projection",
    "compression_strategy",
    "factor_power_projections",
    "module_projections",
    "project_blocks",
    "projected_side",
    "register_compression",
]
