"""HF ``Conv1D`` (GPT-2): ``y = x W + b`` with weight ``(in, out)``, which is ``G[:, :in]ᵀ``.

Any class named ``Conv1D`` with a 2-D weight whose ``nf`` (if it has one) is its output width is
treated as one, so the transformers package need not be imported to recognise it.
"""

from __future__ import annotations

import torch
from torch import nn

from kronlab.curvature.layers.base import LayerAdapter


class HFConv1DAdapter(LayerAdapter, kind="conv1d"):
    """A linear layer stored transposed: its weight's rows are the input side."""

    description = "HF Conv1D"
    output_axis = 1

    def matches(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return (
            type(module).__name__ == "Conv1D"
            and isinstance(weight, torch.Tensor)
            and weight.ndim == 2
            and getattr(module, "nf", weight.shape[1]) == weight.shape[1]
        )

    def weight_dims(self, module: nn.Module) -> tuple[int, int]:
        d_in, d_out = module.weight.shape
        return d_out, d_in

    def weight_matrix(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.transpose(0, 1)

    def matrix_weight(self, module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.transpose(-1, -2)
