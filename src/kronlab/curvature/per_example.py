"""Per-example gradients of tracked modules from hooked activations and output gradients.

``G_i = Σ_t g_t a_tᵀ`` (Koh & Liang 2017's per-example gradients, in K-FAC's layout), formed per
module as one batched product; the full per-example model gradient is never built. With
projections ``(P_S, P_A)`` the result is ``P_S G_i P_Aᵀ = Σ_t (P_S g_t)(P_A a_t)ᵀ``, formed from
the projected vectors, so ``G_i`` itself is never materialized either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kronlab.curvature.hooks import LayerBatch, LossFn, layer_batches
from kronlab.curvature.layers.base import LayerSpec

Projection = tuple[torch.Tensor | None, torch.Tensor | None]


def per_example_gradients(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    modules: Mapping[str, nn.Module],
    projections: Mapping[str, Projection] | None = None,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per tracked module, the per-example gradient matrices ``(n, d_out, d_in)``.

    ``loss_fn(model, batch)`` returns the **sum** over the batch's examples (and their tokens)
    of the per-example loss, so each ``G_i`` is the unscaled gradient of example ``i``'s loss.
    ``d_in`` includes the bias column (see :mod:`kronlab.curvature.layers` for the layout).
    ``projections[name] = (P_S (p_S × d_out), P_A (p_A × d_in))`` (either may be ``None`` for
    the identity) returns ``P_S G_i P_Aᵀ`` of shape ``(n, p_S, p_A)`` instead. ``mask`` ``(n, T)``
    zeroes padding tokens. Parameters' ``.grad`` are left untouched.
    """
    projections = dict(projections or {})
    unknown = sorted(set(projections) - set(modules))
    if unknown:
        raise ValueError(f"Invalid projections: no tracked module named {unknown}")
    results: dict[str, torch.Tensor] = {}
    for layer in layer_batches(model, batch, loss_fn, dict(modules), mask=mask):
        projection = projections.get(layer.name)
        if projection is not None:
            _check_projection(layer.name, layer.spec, projection)
        contribution = example_gradients(layer, projection)
        previous = results.get(layer.name)
        # A module called several times in one forward (shared weights) sums its calls.
        results[layer.name] = contribution if previous is None else previous + contribution
    return results


def example_gradients(layer: LayerBatch, projection: Projection | None = None) -> torch.Tensor:
    """``Σ_t (P_S g_t)(P_A a_t)ᵀ`` per example for one :class:`LayerBatch`: two projections
    of the token vectors, then one batched ``(n, p_S, T) @ (n, T, p_A)`` product (the layer's
    adapter forms the input side)."""
    output_side, input_side = projection if projection is not None else (None, None)
    gradients = layer.gradients
    if output_side is not None:
        gradients = gradients @ output_side.to(gradients.dtype).transpose(0, 1)
    return layer.spec.adapter.example_gradients(layer, gradients, input_side)


def _check_projection(name: str, spec: LayerSpec, projection: Projection) -> None:
    if not isinstance(projection, (tuple, list)) or len(projection) != 2:
        raise ValueError(
            f"Invalid projections[{name!r}]: {type(projection).__name__} "
            "(allowed: a pair (P_S, P_A), either may be None)"
        )
    for side, matrix, width in (
        ("P_S", projection[0], spec.d_out),
        ("P_A", projection[1], spec.d_in),
    ):
        if matrix is not None and (matrix.ndim != 2 or matrix.shape[1] != width):
            raise ValueError(
                f"Invalid projections[{name!r}] {side} shape: {tuple(matrix.shape)} "
                f"(allowed: (p, {width}))"
            )
