"""Short text forms of tensors for ``repr``: dtype and shape, never the values."""

from __future__ import annotations

import torch


def tensor_summary(tensor: torch.Tensor | None) -> str:
    """``'float32[3, 5]'`` (``'none'`` for ``None``): what a reader needs from a tensor field."""
    if tensor is None:
        return "none"
    dtype = str(tensor.dtype).removeprefix("torch.")
    device = "" if tensor.device.type == "cpu" else f" on {tensor.device}"
    return f"{dtype}[{', '.join(map(str, tensor.shape))}]{device}"
