"""The one AdamW of kronlab: what every optimizer uses for parameters its method does not take.

AdamW (Loshchilov & Hutter, 2019): ``m ← β1 m + (1−β1) g``, ``v ← β2 v + (1−β2) g²``,
``p ← p(1 − lr·wd) − lr·m̂/(√v̂ + ε)`` with bias-corrected ``m̂, v̂``. The moments are float32
whatever the parameter dtype; half-precision parameters are stepped through float32 copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"


def adamw_step(
    params: Sequence[Tensor],
    states: Sequence[dict[str, Any]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step of ``params`` (each with a gradient) and their ``states`` (created on the
    first step: ``step``, ``exp_avg``, ``exp_avg_sq``), batched with ``torch._foreach_*``."""
    beta1, beta2 = betas
    for param, state in zip(params, states):
        if not state:
            state["step"] = 0
            state[EXP_AVG] = torch.zeros_like(param, dtype=torch.float32)
            state[EXP_AVG_SQ] = torch.zeros_like(param, dtype=torch.float32)
        state["step"] += 1
    grads = [p.grad.float() for p in params]
    exp_avgs = [s[EXP_AVG] for s in states]
    exp_avg_sqs = [s[EXP_AVG_SQ] for s in states]
    # float32 working copies of half-precision parameters, written back at the end
    work = [p if p.dtype == torch.float32 else p.float() for p in params]
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if weight_decay != 0:
        torch._foreach_mul_(work, 1 - lr * weight_decay)
    bias_corrections1 = [1 - beta1 ** s["step"] for s in states]
    root_bias_corrections2 = [(1 - beta2 ** s["step"]) ** 0.5 for s in states]
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, root_bias_corrections2)
    torch._foreach_add_(denominators, eps)
    step_sizes = [-lr / correction for correction in bias_corrections1]
    torch._foreach_addcdiv_(work, exp_avgs, denominators, step_sizes)
    for param, updated in zip(params, work):
        if updated is not param:
            param.copy_(updated)
