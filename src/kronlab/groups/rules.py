"""Rules that decide which parameters share one preconditioner, and the tensor it sees.

A rule finds parameter sets in a model (``identify``), combines their tensors into the one
tensor the preconditioner works on (``group``), and splits a tensor of that shape back
(``ungroup``). Rules are tried in order; the first rule that claims a parameter wins. The names
follow the SIRFShampoo tutorial (Lin et al., 2024) that users already know.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class PreconditionerGroup(ABC):
    """Interface of a grouping rule. Subclass it to write a custom rule."""

    @abstractmethod
    def identify(self, model: nn.Module) -> list[list[nn.Parameter]]:
        """The parameter sets of ``model`` treated jointly (one list per preconditioner)."""

    @abstractmethod
    def group(self, tensors: list[Tensor]) -> Tensor:
        """Combine tensors shaped like one identified set into the preconditioned tensor."""

    @abstractmethod
    def ungroup(self, grouped_tensor: Tensor, tensor_shapes: list[torch.Size]) -> list[Tensor]:
        """Inverse of ``group``: split ``grouped_tensor`` into tensors of ``tensor_shapes``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PerParameter(PreconditionerGroup):
    """One preconditioner per trainable parameter, which keeps its own shape."""

    def identify(self, model: nn.Module) -> list[list[nn.Parameter]]:
        return [[param] for param in model.parameters() if param.requires_grad]

    def group(self, tensors: list[Tensor]) -> Tensor:
        (tensor,) = tensors
        return tensor

    def ungroup(self, grouped_tensor: Tensor, tensor_shapes: list[torch.Size]) -> list[Tensor]:
        (shape,) = tensor_shapes
        return [grouped_tensor.reshape(shape)]


class LinearWeightBias(PreconditionerGroup):
    """``nn.Linear`` weight ``(out, in)`` and bias ``(out,)`` as one ``(out, in + 1)`` matrix."""

    def identify(self, model: nn.Module) -> list[list[nn.Parameter]]:
        return [
            [module.weight, module.bias]
            for module in model.modules()
            if isinstance(module, nn.Linear)
            and module.bias is not None
            and module.weight.requires_grad
            and module.bias.requires_grad
        ]

    def group(self, tensors: list[Tensor]) -> Tensor:
        weight, bias = tensors
        return torch.cat([weight, bias.unsqueeze(-1)], dim=-1)

    def ungroup(self, grouped_tensor: Tensor, tensor_shapes: list[torch.Size]) -> list[Tensor]:
        weight_shape, bias_shape = tensor_shapes
        return [
            grouped_tensor[:, :-1].reshape(weight_shape),
            grouped_tensor[:, -1].reshape(bias_shape),
        ]


class FlattenEmbedding(PreconditionerGroup):
    """``nn.Embedding`` weight ``(num, dim)`` treated as one vector of ``num · dim`` entries."""

    def identify(self, model: nn.Module) -> list[list[nn.Parameter]]:
        return [
            [module.weight]
            for module in model.modules()
            if isinstance(module, nn.Embedding) and module.weight.requires_grad
        ]

    def group(self, tensors: list[Tensor]) -> Tensor:
        (weight,) = tensors
        return weight.flatten()

    def ungroup(self, grouped_tensor: Tensor, tensor_shapes: list[torch.Size]) -> list[Tensor]:
        (shape,) = tensor_shapes
        return [grouped_tensor.reshape(shape)]


def check_rules(rules: object) -> tuple[PreconditionerGroup, ...]:
    """Normalize ``combine_params`` (one rule or a sequence) to a non-empty tuple of rules."""
    if isinstance(rules, PreconditionerGroup):
        return (rules,)
    if not isinstance(rules, Sequence) or not rules:
        raise ValueError(
            f"combine_params must be a PreconditionerGroup or a non-empty sequence of them, "
            f"got {rules!r}"
        )
    for rule in rules:
        if not isinstance(rule, PreconditionerGroup):
            raise ValueError(
                f"combine_params entries must be PreconditionerGroup instances, got {rule!r}"
            )
    return tuple(rules)
