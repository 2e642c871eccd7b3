"""Gradient compression for the attribution store: random projections and the modes that use
them (``project``, ``folded``, ``whitened``), each a :class:`CompressionStrategy`."""

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

# Registration: one import per mode, in the order the command line lists them.
# isort: off
from kronlab.attribution.compression import project  # noqa: F401
from kronlab.attribution.compression import folded  # noqa: F401
from kronlab.attribution.compression import whitened  # noqa: F401
# isort: on

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
