"""Which modules K-FAC can track: one :class:`LayerAdapter` per layer type, one file each.

Every tracked module computes ``s_t = W a_t (+ b)`` per token ``t``; its weight gradient for one
example is ``G = Σ_t g_t a_tᵀ`` of shape ``(d_out, d_in [+1])`` (see :mod:`.base`). A new layer
type is a :class:`~.base.LayerAdapter` subclass with ``kind="name"`` in its own file, imported
below; :mod:`.registry` finds the modules they handle.
"""

# isort: off
# Importing an adapter's file registers it; modules are matched in this order.
from kronlab.curvature.layers import linear, hf_conv1d, conv2d, embedding  # noqa: F401
from kronlab.curvature.layers import packed_attention, torch_conv1d  # noqa: F401

# isort: on
from kronlab.curvature.layers.base import LayerAdapter, LayerSpec
from kronlab.curvature.layers.registry import layer_spec, tracked_weight

__all__ = ["LayerAdapter", "LayerSpec", "layer_spec", "tracked_weight"]
