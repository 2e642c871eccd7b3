"""``nn.Conv1d`` (groups 1, zero padding): a :mod:`conv2d <.conv2d>` layer of height 1. The
tokens are the output positions, ``a_t`` the unfolded input window and the weight
``(out, C, k)`` is ``G[:, :C·k]`` reshaped (the unfold order ``C, k``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kronlab.curvature.layers.conv2d import Conv2dAdapter


class TorchConv1dAdapter(Conv2dAdapter, kind="torch_conv1d"):
    """Windows in, output positions out; the input side of the weight is ``C ⊗ k``."""

    description = "nn.Conv1d with groups=1 and zero padding"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv1d)

    def weight_dims(self, module: nn.Module) -> tuple[int, int]:
        return module.out_channels, module.in_channels * module.kernel_size[0]

    def token_inputs(self, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.ndim != 3:
            raise ValueError(
                f"expected batched input (examples, channels, length) to a {self.kind} module, "
                f"got {tuple(inputs.shape)}"
            )
        # As a height-1 image, so one unfold serves both convolutions.
        windows = F.unfold(
            inputs.unsqueeze(2),
            (1, module.kernel_size[0]),
            dilation=(1, module.dilation[0]),
            padding=(0, module.padding[0]),
            stride=(1, module.stride[0]),
        )
        return windows.transpose(1, 2)
