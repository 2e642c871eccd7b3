"""quad_torch 0.5's classes: the README's usage, its defaults, and the step from its rules."""

from __future__ import annotations

import math

import pytest
import torch

from kronlab.compat.quad_torch import QUAD, Procrustes
from tests.optim.test_psgd import (
    reference_factor_step,
    reference_lower_bound,
    reference_procrustes,
    square,
)

F64 = torch.float64


def _factor_step(q, term1, c, lipschitz, mu, method):
    """``reference_factor_step``, with an exactly symmetric dense Procrustes ``Q`` (the first
    step from ``s·I``) left as it is: there is no rotation to normalise."""
    if q.ndim == 2 and method == "procrustes":
        bound = reference_lower_bound(term1) + c
        lipschitz = max(0.95 * lipschitz + 0.05 * bound, bound)
        moved = q - mu / lipschitz * (term1 @ q - c * q)
        return (moved if torch.equal(moved, moved.T) else reference_procrustes(moved)), lipschitz
    return reference_factor_step(q, term1, c, lipschitz, mu, method)


def _reference(param, gradients, *, method, lr, momentum, weight_decay, preconditioner_lr, dense):
    """Several PSGD steps from quad_torch's rules (no fit noise): ``Q = s·I`` with
    ``s = mean(g₁²)^(-1/4)``, ``L = 0``, momentum started at ``g₁``; per step ``m ← lerp(m, g,
    1 − β)``, fit both factors to ``Pg = Q_l² m Q_r²`` with ``μ = max(0.3, μ₀/√(1 + t/10⁴))``,
    then ``p ← p(1 − lr·wd) − lr/5 · clip(Q_l² m Q_r²)``."""
    rows, columns = param.shape
    scale = gradients[0].square().mean() ** -0.25
    factors = [
        scale * (torch.eye(size, dtype=F64) if is_dense else torch.ones(size, dtype=F64))
        for size, is_dense in zip((rows, columns), dense)
    ]
    lipschitz = [torch.tensor(0.0, dtype=F64)] * 2
    averaged = gradients[0].clone()
    param = param.clone()
    for step, gradient in enumerate(gradients, start=1):
        averaged = averaged.lerp(gradient, 1 - momentum)
        mu = max(0.3, preconditioner_lr / math.sqrt(1 + step / 10000))
        preconditioned = square(factors[0]) @ averaged @ square(factors[1])
        terms = [
            preconditioned @ preconditioned.T if dense[0] else (preconditioned**2).sum(1),
            preconditioned.T @ preconditioned if dense[1] else (preconditioned**2).sum(0),
        ]
        for side, size in enumerate((rows, columns)):
            factors[side], lipschitz[side] = _factor_step(
                factors[side], terms[side], rows * columns / size, lipschitz[side], mu, method
            )
        direction = square(factors[0]) @ averaged @ square(factors[1])
        direction = direction * 1.1 / max(direction.square().mean().sqrt(), 1.1)
        param = param * (1 - lr * weight_decay) - lr / 5 * direction
    return param


@pytest.mark.parametrize("optimizer_class", [QUAD, Procrustes])
@pytest.mark.parametrize(
    ("shape", "skew", "dense"), [((5, 4), math.inf, (True, True)), ((8, 3), 1.0, (False, True))]
)
def test_steps_match_the_rules(optimizer_class, shape, skew, dense) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, dtype=F64, generator=generator)
    gradients = [torch.randn(shape, dtype=F64, generator=generator) for _ in range(4)]
    param = torch.nn.Parameter(weight.clone())
    optimizer = optimizer_class(
        [param], lr=0.01, max_skew_dense=skew, preconditioner_lr=0.1, noise_scale=0.0
    )
    for gradient in gradients:
        param.grad = gradient.clone()
        optimizer.step()
    expected = _reference(
        weight,
        gradients,
        method=optimizer_class.method,
        lr=0.01,
        momentum=0.95,
        weight_decay=0.1,
        preconditioner_lr=0.3,  # 0.1 is raised to quad_torch's floor
        dense=dense,
    )
    assert optimizer.state[param]["left_factor"].dtype == F64  # dtype=None: the gradient's
    torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-6)


def test_readme_usage_prints_each_shape_decision_once(capsys) -> None:
    model = torch.nn.Linear(10, 10)
    optimizer = Procrustes(
        model.parameters(),
        lr=0.001,
        lr_style="adam",
        momentum=0.95,
        weight_decay=0.1,
        max_size_dense=16384,
        max_skew_dense=1.0,
        preconditioner_lr=0.7,
        preconditioner_init_scale=None,
        noise_scale=1e-9,
        dtype=torch.bfloat16,
    )
    inputs, targets = torch.randn(32, 10), torch.randn(32, 10)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["10x10 → 10x10 → [dense, dense]", "10 → 10 → [diagonal]"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
