"""A supervised task: fixed train/test tensors, a model factory and a loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ClassificationTask:
    """Inputs and integer labels split once (deterministically), and a model builder.

    ``make_model(seed)`` returns a freshly initialized model; the same seed gives the same
    weights, so every optimizer in a comparison starts from one point.
    """

    name: str
    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    make_model: Callable[[int], nn.Module]
    num_classes: int

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, targets)
