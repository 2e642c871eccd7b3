"""Emerging-Optimizers' Spectron names, against a float64 transcription of the PR's step."""

from __future__ import annotations

import pytest
import torch

from kronlab.compat.emerging_optimizers import Spectron
from kronlab.linalg import NEWTON_SCHULZ_COEFFICIENTS

from .training import mse_losses

SCHEDULES = {
    "simple": [(3.4445, -4.7750, 2.0315)] * 5,
    "quintic": [
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ],
}


def _newton_schulz(matrix: torch.Tensor, schedule) -> torch.Tensor:
    x = matrix.T if matrix.shape[0] > matrix.shape[1] else matrix
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for a, b, c in schedule:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if matrix.shape[0] > matrix.shape[1] else x


def _reference(weight, gradients, *, lr, beta, weight_decay, method, rank, schedule):
    """SVD init ``A = U√S``, ``B = V√S``; factor gradients, weight decay by method, EMA momenta,
    orthogonalize, ``ρ = lr/(‖A‖₂ + ‖B‖₂ + 1)``, ``W = A Bᵀ`` (exact spectral norms)."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    a, b = u[:, :rank] * s[:rank].sqrt(), vh[:rank].T * s[:rank].sqrt()
    momentum_a, momentum_b = torch.zeros_like(a), torch.zeros_like(b)
    for gradient in gradients:
        grad_a, grad_b = gradient @ b, gradient.T @ a
        if method == "l2":
            grad_a, grad_b = grad_a + weight_decay * a, grad_b + weight_decay * b
        else:
            decay = 1 - (lr * weight_decay if method == "decoupled" else weight_decay)
            a, b = a * decay, b * decay
        momentum_a = beta * momentum_a + (1 - beta) * grad_a
        momentum_b = beta * momentum_b + (1 - beta) * grad_b
        sigma_a, sigma_b = torch.linalg.matrix_norm(a, 2), torch.linalg.matrix_norm(b, 2)
        step = lr / (sigma_a + sigma_b + 1)
        a = a - step * _newton_schulz(momentum_a, schedule)
        b = b - step * _newton_schulz(momentum_b, schedule)
    return a @ b.T


@pytest.mark.parametrize("method", ["decoupled", "independent", "l2"])
@pytest.mark.parametrize("coefficient_type", ["simple", "quintic"])
def test_step_matches_the_definition(method: str, coefficient_type: str) -> None:
    generator = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(7, 4, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(5, 4, generator=generator, dtype=torch.float64)).Q
    # well separated singular values: the power iteration converges to ‖·‖₂ in few steps
    weight = (left * torch.tensor([3.0, 1.5, 0.6, 0.2], dtype=torch.float64)) @ right.T
    gradients = [torch.randn(7, 5, generator=generator, dtype=torch.float64) for _ in range(4)]
    options = dict(lr=0.05, beta=0.9, weight_decay=0.1, method=method, rank=3)
    expected = _reference(weight, gradients, schedule=SCHEDULES[coefficient_type], **options)
    param = torch.nn.Parameter(weight.float())
    optimizer = Spectron(
        [param],
        lr=0.05,
        momentum_beta=0.9,
        weight_decay=0.1,
        weight_decay_method=method,
        rank=3,
        num_power_iter=30,
        coefficient_type=coefficient_type,
    )
    for gradient in gradients:
        param.grad = gradient.float()
        optimizer.step()
    torch.testing.assert_close(param.detach().double(), expected, rtol=0, atol=2e-5)


def test_named_sets_are_the_published_coefficients() -> None:
    for name, schedule in SCHEDULES.items():
        coefficients = NEWTON_SCHULZ_COEFFICIENTS[name]
        assert [coefficients.for_step(i) for i in range(5)] == schedule
    assert NEWTON_SCHULZ_COEFFICIENTS["quintic"].for_step(5) == SCHEDULES["quintic"][0]  # cycled


def test_the_pull_request_usage_trains_with_rank_capped() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(16, 4, bias=False)
    )
    optimizer = Spectron(
        model.parameters(),
        lr=0.02,
        momentum_beta=0.95,
        weight_decay=0.0,
        weight_decay_method="independent",
        fp32_matmul_prec="highest",
        num_ns_steps=5,
        num_power_iter=1,
        coefficient_type="simple",
    )
    inputs, targets = torch.randn(64, 8), torch.randn(64, 4)
    losses = mse_losses(model, optimizer, inputs, targets, steps=10)
    assert losses[-1] < losses[0]
    ranks = {optimizer.state[p]["factor_a"].shape[1] for p in model.parameters()}
    assert ranks == {4, 8}  # default rank 64 capped at min(m, n)


def test_bad_names_are_refused() -> None:
    param = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="weight_decay_method"):
        Spectron([param], weight_decay_method="palm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fp32_matmul_prec"):
        Spectron([param], fp32_matmul_prec="low")
