"""NVIDIA Emerging-Optimizers' Spectron (pull request #104) names over ``kronlab.optim.Spectron``.

``Spectron(params, lr, momentum_beta, weight_decay, *, weight_decay_method, fp32_matmul_prec,
rank, num_ns_steps, num_power_iter, coefficient_type)``. ``rank`` defaults to 64 and is capped
at ``min(m, n)`` per matrix. Parameters with fewer than two dims go to kronlab's auxiliary AdamW
instead of being refused.
"""

from __future__ import annotations

from typing import Literal

from kronlab.optim.base import ParamsT
from kronlab.optim.spectron import Spectron as KronlabSpectron
from kronlab.optim.validation import check_choice

WeightDecayMethod = Literal["decoupled", "independent", "l2"]
MATMUL_PRECISIONS = ("highest", "high", "medium")


class Spectron(KronlabSpectron):
    """Spectron (Janson, Oyallon & Belilovsky, 2026) with Emerging-Optimizers' argument names.

    Args:
        params: parameters or param groups.
        lr: bound on the spectral norm of each weight update.
        momentum_beta: EMA rate of the factor momenta (kronlab: ``momentum``).
        weight_decay: weight decay of the factors, applied per ``weight_decay_method``:
            ``"decoupled"`` ``A ← (1 − lr·wd)A``, ``"independent"`` ``A ← (1 − wd)A``,
            ``"l2"`` ``G_A ← G_A + wd·A``.
        fp32_matmul_prec: ``"highest"``, ``"high"`` or ``"medium"``; accepted for the names'
            sake: kronlab always computes the factor products at ``"highest"``.
        rank: factor rank, capped at ``min(m, n)`` of each matrix.
        num_ns_steps: Newton–Schulz steps (kronlab: ``ns_steps``).
        num_power_iter: warm-started power-iteration steps (kronlab: ``power_iterations``).
        coefficient_type: a Newton–Schulz coefficient set by name (``"simple"``, ``"quintic"``,
            ``"polar_express"``, ``"cubic"``; kronlab: ``ns_coefficients``).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-4,
        momentum_beta: float = 0.9,
        weight_decay: float = 0.01,
        *,
        weight_decay_method: WeightDecayMethod = "decoupled",
        fp32_matmul_prec: str = "medium",
        rank: int = 64,
        num_ns_steps: int = 5,
        num_power_iter: int = 1,
        coefficient_type: str = "quintic",
    ) -> None:
        check_choice("fp32_matmul_prec", fp32_matmul_prec, MATMUL_PRECISIONS)
        self.fp32_matmul_prec = fp32_matmul_prec
        super().__init__(
            params,
            lr=lr,
            rank=rank,
            momentum=momentum_beta,
            weight_decay=weight_decay,
            ns_steps=num_ns_steps,
            power_iterations=num_power_iter,
            ns_coefficients=coefficient_type,
            weight_decay_method=weight_decay_method,
            cap_rank=True,
        )
