"""Limits where the Shampoo family reduces to a known optimizer, and continuity of the
per-factor eigenvalue correction across a basis refresh."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kronlab.optim import SOAP, Shampoo


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        inputs = torch.randn(8, 5, generator=generator, dtype=torch.float64)
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("preconditioner", ["root_inv", "eigenvalue_corrected"])
@pytest.mark.parametrize("decoupled", [True, False])
def test_grafting_alone_is_adamw_or_adam(preconditioner: str, decoupled: bool) -> None:
    # start_preconditioning_step = inf with Adam grafting: AdamW (decoupled weight decay) or
    # Adam with L2 weight decay, over 20 steps.
    reference_model, model = tiny_mlp(), tiny_mlp()
    options = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    if decoupled:
        reference = torch.optim.AdamW(reference_model.parameters(), eps=1e-8, **options)
    else:
        reference = torch.optim.Adam(reference_model.parameters(), eps=1e-8, **options)
    optimizer = Shampoo(
        model.parameters(),
        epsilon=1e-8,
        preconditioner=preconditioner,
        grafting="adam",
        start_preconditioning_step=math.inf,
        decoupled_weight_decay=decoupled,
        **options,
    )
    train(reference_model, reference, 20)
    train(model, optimizer, 20)
    for expected, actual in zip(reference_model.parameters(), model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("eigenbasis", ["eigh", "qr"])
def test_eigenvalue_corrected_with_identity_basis_is_adam(eigenbasis: str) -> None:
    # Diagonal gradients keep both factors diagonal, so the eigenbasis is the identity up to
    # order and signs: SOAP must then be exactly Adam, including across refreshes. SOAP's first
    # step only measures the factors, so it is Adam started from the second gradient.
    generator = torch.Generator().manual_seed(2)
    gradients = [
        torch.diag(torch.rand(4, generator=generator, dtype=torch.float64) + 0.1) for _ in range(12)
    ]
    start = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    adam_param, soap_param = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    adam = torch.optim.Adam([adam_param], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    soap = SOAP(
        [soap_param],
        lr=1e-2,
        betas=(0.9, 0.95),
        epsilon=1e-8,
        weight_decay=0.0,
        precondition_frequency=3,
        eigenbasis=eigenbasis,
        factor_dtype=torch.float64,
    )
    for step, gradient in enumerate(gradients, start=1):
        adam_param.grad, soap_param.grad = gradient.clone(), gradient.clone()
        if step > 1:
            adam.step()
        soap.step()
    torch.testing.assert_close(soap_param, adam_param, rtol=0, atol=1e-12)
    assert not torch.allclose(soap_param, start)


def test_per_factor_correction_is_continuous_across_a_refresh() -> None:
    # Slowly drifting gradients; the eigenbasis is refreshed after steps 1, 5, 9, 13. Every step
    # E_k ← β₂ E_k + (1 − β₂) diag(Q_kᵀ O_t Q_k) in the basis of that step; a refresh then only
    # changes Q_k (each eigenvalue follows its column), never resetting E_k to the factor's
    # eigenvalues, so the spectrum moves about as much at a refresh as on other steps.
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    param = nn.Parameter(torch.zeros(5, 4, dtype=torch.float64))
    beta2 = 0.9
    optimizer = Shampoo(
        [param],
        lr=1e-3,
        betas=(0.0, beta2),
        epsilon=1e-6,
        preconditioner="per_factor_eigenvalue_corrected",
        precondition_frequency=4,
        grafting="none",
        max_preconditioner_dim=None,
        factor_dtype=torch.float64,
    )
    refresh_steps = [5, 9, 13]
    changes = {}
    previous = None
    for step in range(1, 14):
        gradient = base + 0.3 * torch.randn(5, 4, generator=generator, dtype=torch.float64)
        param.grad = gradient
        before = None if previous is None else [v.clone() for v in previous.eigenvalues]
        old_basis = None if previous is None else [q.clone() for q in previous.eigenvectors]
        optimizer.step()
        (block,) = optimizer.kronecker_factors(param)
        if before is not None:
            if step in refresh_steps:
                assert not torch.allclose(block.eigenvectors[0], old_basis[0])
            outer = [gradient @ gradient.T, gradient.T @ gradient]
            for ema, old, vectors, product in zip(block.eigenvalues, before, old_basis, outer):
                expected = beta2 * old + (1 - beta2) * torch.diagonal(vectors.T @ product @ vectors)
                if step in refresh_steps:  # reordered with their columns, values unchanged
                    ema, expected = ema.sort().values, expected.sort().values
                torch.testing.assert_close(ema, expected)
            changes[step] = max(
                ((new.sort().values - old.sort().values).norm() / old.norm()).item()
                for new, old in zip(block.eigenvalues, before)
            )
        previous = block
    ordinary = [change for step, change in changes.items() if step not in refresh_steps]
    assert max(changes[s] for s in refresh_steps) < 2 * max(ordinary)
    state = optimizer.state[param]["blocks"][0]
    factor_values = torch.linalg.eigvalsh(state["factors"][0]) / (1 - beta2**13)
    ema_values = state["eigenvalue_ema"][0].sort().values / (1 - beta2**13)
    assert not torch.allclose(factor_values, ema_values, rtol=1e-3)
