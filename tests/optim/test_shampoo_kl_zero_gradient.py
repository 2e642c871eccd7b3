"""KL-Shampoo after an all-zero gradient: no inverse from eigenvalues that were never measured."""

from __future__ import annotations

import pytest
import torch

from kronlab.optim.shampoo import KLShampoo


@pytest.mark.parametrize("preconditioner", ["per_factor_eigenvalue_corrected", "eigendecomposed"])
def test_factors_after_a_zero_first_gradient_use_the_plain_gradient(preconditioner: str) -> None:
    """Step 1's eigenvalues are all zero, so step 2's statistics skip the KL preconditioning:
    ``L = (1 − β₂) G Gᵀ / n`` and ``R = (1 − β₂) Gᵀ G / m`` (not ``1/ε`` times that)."""
    beta2 = 0.95
    param = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    optimizer = KLShampoo(
        [param],
        betas=(0.9, beta2),
        epsilon=1e-8,
        preconditioner=preconditioner,
        precondition_frequency=1,
        merge_dims=False,
        factor_dtype=torch.float64,
    )
    gradient = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    param.grad = torch.zeros_like(param)
    optimizer.step()
    param.grad = gradient.clone()
    optimizer.step()
    (block,) = optimizer.kronecker_factors(param)
    left, right = (factor.squeeze(0) if factor.ndim == 3 else factor for factor in block.factors)
    torch.testing.assert_close(left, (1 - beta2) * gradient @ gradient.T / 3, rtol=1e-12, atol=0)
    torch.testing.assert_close(right, (1 - beta2) * gradient.T @ gradient / 4, rtol=1e-12, atol=0)
    assert torch.isfinite(param).all()
