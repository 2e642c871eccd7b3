"""``nn.MultiheadAttention``'s packed in-projection: one ``(3E, E [+1])`` block laid out as
``in_proj_weight`` (``in_proj_bias``). torch applies it inside a fused call, so no forward hook
sees it; :mod:`kronlab.curvature.attention` records it from a forward with visible projections
(and says why it is one block, not three). ``out_proj`` is an ``nn.Linear`` of its own."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from kronlab.curvature.attention import attention_hooks, packed_in_projection
from kronlab.curvature.layers.base import LayerAdapter, LayerSpec

if TYPE_CHECKING:
    from kronlab.curvature.layers.base import RecordFor, Undo


class PackedAttentionAdapter(LayerAdapter, kind="attention"):
    """A linear layer over the query (and key, value) tokens with weight ``in_proj_weight``."""

    description = "nn.MultiheadAttention"
    hooked = False  # recorded from inside the module's forward, see reroute

    def matches(self, module: nn.Module) -> bool:
        return packed_in_projection(module)

    def reroute(
        self, model: nn.Module, tracked: dict[str, nn.Module], record_for: RecordFor
    ) -> list[Undo]:
        """Every attention module whose in-projection or ``out_proj`` is tracked runs through
        :func:`~kronlab.curvature.attention.attention_forward`, which shows both."""
        return attention_hooks(model, tracked, record_for)

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.in_proj_weight

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        return module.in_proj_bias

    def weight_dims(self, module: nn.Module) -> tuple[int, int]:
        return 3 * module.embed_dim, module.embed_dim

    def spec(self, module: nn.Module, include_bias: bool) -> LayerSpec | None:
        # The in-projection's bias is part of the block whatever include_bias says.
        has_bias = module.in_proj_bias is not None
        d_out, d_in = self.weight_dims(module)
        return LayerSpec(self.kind, d_out, d_in + int(has_bias), has_bias)
