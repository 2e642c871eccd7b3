"""A few full-batch MSE steps, for the compat constructors' smoke tests."""

from __future__ import annotations

import torch
from torch import nn


def mse_losses(
    model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
    targets: torch.Tensor, steps: int,
) -> list[float]:  # fmt: skip
    """The loss before each of ``steps`` steps on the same batch."""
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
