"""First-order baselines from ``torch.optim``, registered for ``kronlab compare``."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer

from kronlab.optim.registry import register_optimizer


@register_optimizer("adamw", default_lr=3e-3, summary="torch.optim.AdamW (reference)")
def _adamw(model: nn.Module, lr: float) -> Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)


@register_optimizer("adam", default_lr=3e-3, summary="torch.optim.Adam")
def _adam(model: nn.Module, lr: float) -> Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr)


@register_optimizer("sgd", default_lr=0.05, summary="torch.optim.SGD with momentum 0.9")
def _sgd(model: nn.Module, lr: float) -> Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
