"""The schedule and weight decay every optimizer in the benchmark gets.

Warm-up: linear over the first :data:`WARMUP_FRACTION` of the steps; then cosine from the peak
down to :data:`FINAL_FRACTION` of it. Weight decay is decoupled, ``p ← p (1 − lr_t · λ)`` with
each param group's scheduled ``lr_t`` and one ``λ`` for all, applied by the harness (each
optimizer's own weight-decay setting is zeroed), so no optimizer carries its own decay default.
"""

from __future__ import annotations

import math

import torch

WARMUP_FRACTION = 0.05
FINAL_FRACTION = 0.1
WEIGHT_DECAY = 0.01
_DECAY_KEYS = ("weight_decay", "kappa")  # kappa: SIRFShampoo's and SINGD's weight decay


def lr_factor(step: int, steps: int) -> float:
    """Multiplier of the peak learning rate at 1-based ``step`` of ``steps``."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step <= warmup:
        return step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return FINAL_FRACTION + (1 - FINAL_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


class Schedule:
    """Sets every param group's lr for a step and applies the shared decoupled weight decay."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int) -> None:
        self.optimizer = optimizer
        self.steps = steps
        self.peak_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            for key in _DECAY_KEYS:
                if key in group:
                    group[key] = 0.0

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        factor = lr_factor(step, self.steps)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak * factor
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                torch._foreach_mul_(params, 1 - group["lr"] * WEIGHT_DECAY)
