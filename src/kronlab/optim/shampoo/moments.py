"""First-order pieces of the Shampoo step: the filtered gradient and the grafting direction."""

from __future__ import annotations

import math
from typing import Any

import torch

from kronlab.factors.accumulation import accumulate_, accumulate_square_, bias_correction
from kronlab.optim.shampoo.settings import StackSettings


def filtered_gradient(
    state: dict[str, Any],
    gradient: torch.Tensor,
    settings: StackSettings,
    key: str = "momentum",
) -> torch.Tensor:
    """``M = m̂``, ``m ← β₁ m + (1 − β₁) g``; Nesterov uses ``β₁ m + (1 − β₁) g`` after the
    update (bias-corrected by ``1 − β₁^t``); ``β₁ = 0`` is the raw gradient. ``key`` names the
    state entry. A new tensor unless ``β₁ = 0``."""
    if settings.beta1 == 0.0:
        return gradient
    # Always a fresh tensor (callers may edit it in place), never the momentum state itself.
    numerator, correction = momentum_numerator(state, gradient, settings, key)
    return numerator / correction


def momentum_numerator(
    state: dict[str, Any],
    gradient: torch.Tensor,
    settings: StackSettings,
    key: str = "momentum",
) -> tuple[torch.Tensor, float]:
    """``(N, bc₁)`` with ``N / bc₁`` the filtered gradient: the momentum updated in place
    (``state[key]`` itself: read it, never write it), its Nesterov mix, or the gradient
    (``β₁ = 0``). For callers that fold the bias correction into a later scale instead of
    spending a pass (and a temporary) on it (SOAP's momentum in the eigenbasis)."""
    if settings.beta1 == 0.0:
        return gradient, 1.0
    momentum = _zero_initialised(state, key, gradient)
    accumulate_(momentum, gradient, settings.beta1)
    numerator = gradient.lerp(momentum, settings.beta1) if settings.nesterov else momentum
    return numerator, bias_correction(settings.beta1, state["step"], settings.bias_correction)


def grafting_direction(
    state: dict[str, Any],
    gradient: torch.Tensor,
    filtered: torch.Tensor,
    settings: StackSettings,
) -> torch.Tensor | None:
    """The grafting method's direction on the filtered gradient (``None`` for ``"none"``).

    adagrad: ``M / (√Σg² + ε)``; rmsprop: ``M / (√v + ε)``; adam: ``M / (√(v/bc₂) + ε)`` with
    ``v ← β v + (1 − β) g²`` — exactly AdamW's direction when used alone.
    """
    grafting = settings.grafting
    if grafting.method == "none":
        return None
    if grafting.method == "sgd":
        return filtered
    second_moment, correction = _grafting_second_moment(state, gradient, settings)
    return filtered / adam_denominator(second_moment, correction, grafting.epsilon)


def grafting_norms(
    state: dict[str, Any],
    gradient: torch.Tensor,
    filtered: torch.Tensor,
    filtered_correction: float,
    settings: StackSettings,
) -> torch.Tensor | None:
    """Per-block Frobenius norms ``(B,)`` of ``grafting_direction`` on ``M = filtered / c``
    (``c = filtered_correction``), all a graft needs once preconditioning runs. The direction
    itself is never formed: with ``√(v/bc₂) + ε = (√v + ε√bc₂)/√bc₂`` the adam norm is
    ``‖m̃ / (√v + ε√bc₂)‖ · √bc₂ / c``, one temporary and three passes after ``v``'s update
    (``grafting_direction`` makes two temporaries and four passes, plus the one for ``m̃ / c``).
    ``None`` for ``"none"``; updates the grafting second moment like ``grafting_direction``.
    """
    grafting = settings.grafting
    if grafting.method == "none":
        return None
    dims = tuple(range(1, filtered.ndim))
    if grafting.method == "sgd":
        return torch.linalg.vector_norm(filtered, dim=dims).div_(filtered_correction)
    second_moment, correction = _grafting_second_moment(state, gradient, settings)
    root_correction = math.sqrt(correction)
    quotient = second_moment.sqrt().add_(grafting.epsilon * root_correction)
    torch.div(filtered, quotient, out=quotient)
    norms = torch.linalg.vector_norm(quotient, dim=dims)
    return norms.mul_(root_correction / filtered_correction)


def _grafting_second_moment(
    state: dict[str, Any], gradient: torch.Tensor, settings: StackSettings
) -> tuple[torch.Tensor, float]:
    """The updated grafting second moment and its bias correction (1 except for adam)."""
    grafting = settings.grafting
    if grafting.method == "adagrad":
        beta = 1.0
    else:
        beta = settings.beta2 if grafting.beta2 is None else grafting.beta2
    second_moment = _zero_initialised(state, "grafting_second_moment", gradient)
    accumulate_square_(second_moment, gradient, beta)
    correction = 1.0
    if grafting.method == "adam":
        correction = bias_correction(beta, state["step"], settings.bias_correction)
    return second_moment, correction


def diagonal_direction(
    state: dict[str, Any], gradient: torch.Tensor, filtered: torch.Tensor, settings: StackSettings
) -> torch.Tensor:
    """Elementwise preconditioning of vectors and scalars: Adam's ``M / (√(v/bc₂) + ε)`` with the
    optimizer's ``β₂`` and ``ε`` (what SOAP does for 1-D parameters)."""
    second_moment = _zero_initialised(state, "diagonal_second_moment", gradient)
    accumulate_square_(second_moment, gradient, settings.beta2)
    correction = bias_correction(settings.beta2, state["step"], settings.bias_correction)
    return filtered / adam_denominator(second_moment, correction, settings.epsilon)


def adam_quotient_(
    out: torch.Tensor,
    numerator: torch.Tensor,
    second_moment: torch.Tensor,
    correction: float,
    epsilon: float,
) -> float:
    """``out ← N / (√v + ε√bc₂)`` and return ``√bc₂``, so that ``√bc₂ · out = N / (√(v/bc₂) + ε)``
    is Adam's quotient with the bias correction left as a scale for the caller to apply where
    it is free (a GEMM's ``alpha``). Three passes over ``out``, no temporary; ``out`` must not
    be ``numerator``."""
    root = math.sqrt(correction)
    torch.sqrt(second_moment, out=out).add_(epsilon * root)
    torch.div(numerator, out, out=out)
    return root


def adam_denominator(
    second_moment: torch.Tensor, correction: float, epsilon: float
) -> torch.Tensor:
    """``√(v / bc₂) + ε`` with one temporary (the square root and ε in place)."""
    return (second_moment / correction).sqrt_().add_(epsilon)


def graft_scales(direction: torch.Tensor, target_norms: torch.Tensor) -> torch.Tensor:
    """Per-block factors ``(B, 1, …)`` that give each block of ``direction`` the norm
    ``target_norms`` ``(B,)`` (0 for a zero block), for the final update to apply."""
    dims = tuple(range(1, direction.ndim))
    own = torch.linalg.vector_norm(direction, dim=dims)
    scales = torch.where(own > 0, target_norms / own, 0.0)
    return scales.reshape(-1, *([1] * len(dims)))


def _zero_initialised(state: dict[str, Any], key: str, like: torch.Tensor) -> torch.Tensor:
    # Not ``setdefault(key, zeros_like(...))``: that would allocate and zero-fill every step.
    if key not in state:
        state[key] = torch.zeros_like(like)
    return state[key]
