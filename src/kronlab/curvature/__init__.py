"""Model hooks for K-FAC statistics and per-example gradients of tracked modules.

Tracked modules are those a registered :class:`LayerAdapter` handles (``nn.Linear``, HF
``Conv1D``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``, ``nn.MultiheadAttention``'s packed
in-projection; one file each in :mod:`kronlab.curvature.layers`), with or without bias. The
gradient of one example is the matrix ``G_i = Σ_t g_t a_tᵀ`` of shape ``(d_out, d_in [+1 for
the bias])``.
"""

from kronlab.curvature.hooks import LayerBatch, LossFn, layer_batches
from kronlab.curvature.layers.base import LayerAdapter, LayerSpec, registered_adapters
from kronlab.curvature.layers.registry import (
    bias_in_curvature,
    find_modules,
    find_modules_outside_attention,
    gradient_matrix,
    includes_bias,
    layer_adapter,
    layer_spec,
    parameters_from_matrix,
    tracked_weight,
)
from kronlab.curvature.per_example import Projection, example_gradients, per_example_gradients
from kronlab.curvature.statistics import KroneckerStatistics

__all__ = [
    "KroneckerStatistics",
    "LayerAdapter",
    "LayerBatch",
    "LayerSpec",
    "LossFn",
    "Projection",
    "bias_in_curvature",
    "example_gradients",
    "find_modules",
    "find_modules_outside_attention",
    "gradient_matrix",
    "includes_bias",
    "layer_adapter",
    "layer_batches",
    "layer_spec",
    "parameters_from_matrix",
    "per_example_gradients",
    "registered_adapters",
    "tracked_weight",
]
