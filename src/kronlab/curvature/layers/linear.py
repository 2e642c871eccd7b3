"""``nn.Linear``: ``s_t = W x_t + b`` with weight ``(out, in)``, which is ``G[:, :in]`` as is."""

from __future__ import annotations

from torch import nn

from kronlab.curvature.layers.base import LayerAdapter


class LinearAdapter(LayerAdapter, kind="linear"):
    """Every token of the input's leading dims is one ``a_t``; the base class's defaults."""

    description = "nn.Linear"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def grouped_shapes(self, module: nn.Module) -> list[tuple[int, ...]]:
        """Its own ``(out, in)``, or ``(out, in + 1)`` where an optimizer groups the bias as a
        last column of the weight (``LinearWeightBias``)."""
        shapes = super().grouped_shapes(module)
        if module.bias is not None:
            shapes.append((module.out_features, module.in_features + 1))
        return shapes
