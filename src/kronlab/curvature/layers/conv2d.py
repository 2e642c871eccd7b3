"""``nn.Conv2d`` (groups 1, zero padding) as K-FAC for convolutions sees it (KFC, Grosse &
Martens 2016): the tokens are the output positions, ``a_t`` is the unfolded input patch and the
weight ``(out, C, kh, kw)`` is ``G[:, :C·kh·kw]`` reshaped (the unfold order ``C, kh, kw``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kronlab.curvature.layers.base import LayerAdapter


class Conv2dAdapter(LayerAdapter, kind="conv2d"):
    """Patches in, output positions out; the input side of the weight is ``C ⊗ kh ⊗ kw``."""

    description = "nn.Conv2d with groups=1 and zero padding"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d)

    def trackable(self, module: nn.Module) -> bool:
        # Grouped convolutions are block-diagonal in G, and non-zero padding modes change a_t.
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )

    def weight_dims(self, module: nn.Module) -> tuple[int, int]:
        patch = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        return module.out_channels, patch

    def weight_matrix(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def matrix_weight(self, module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(*matrix.shape[:-2], *module.weight.shape)

    def token_inputs(self, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        super().token_inputs(module, inputs)  # the batched-input check
        patches = F.unfold(
            inputs,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )
        return patches.transpose(1, 2)

    def token_gradients(
        self, module: nn.Module, output_gradient: torch.Tensor, n: int, d_out: int
    ) -> torch.Tensor:
        return output_gradient.flatten(2).transpose(1, 2)
