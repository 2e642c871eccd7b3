"""Every Shampoo variant's first steps against the dense float64 reference in
``shampoo_reference.py``, plus hand-computable cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kronlab.optim import Shampoo
from kronlab.optim.shampoo import (
    EigendecomposedConfig,
    EigenvalueCorrectedConfig,
    PerFactorEigenvalueCorrectedConfig,
    RootInverseConfig,
)

from .shampoo_reference import reference_trajectory

VARIANT_NAMES = {
    "root_inv": "root_inv",
    "eigendecomposed": "eigendecomposed",
    "eigenvalue_corrected": "eigenvalue_corrected",
    "per_factor": "per_factor_eigenvalue_corrected",
}


def run_optimizer(
    weight: torch.Tensor, gradients: list[torch.Tensor], **options: object
) -> list[torch.Tensor]:
    param = nn.Parameter(weight.clone())
    optimizer = Shampoo([param], factor_dtype=torch.float64, max_preconditioner_dim=None, **options)
    trajectory = []
    for gradient in gradients:
        param.grad = gradient.clone()
        optimizer.step()
        trajectory.append(param.detach().clone())
    return trajectory


def random_problem(steps: int = 5, shape: tuple[int, int] = (4, 3), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(*shape, generator=generator, dtype=torch.float64)
    gradients = [
        torch.randn(*shape, generator=generator, dtype=torch.float64) for _ in range(steps)
    ]
    return weight, gradients


CASES = [
    # (variant, kl, extra options shared by the reference and the optimizer)
    *[(variant, False, {}) for variant in VARIANT_NAMES],
    *[(variant, True, {}) for variant in ("root_inv", "eigendecomposed", "per_factor")],
    ("root_inv", False, {"frequency": 2, "grafting": "adam"}),
    ("eigendecomposed", False, {"frequency": 3, "nesterov": True}),
    ("eigenvalue_corrected", False, {"frequency": 2, "beta2": 1.0}),
    ("eigenvalue_corrected", False, {"frequency": 2, "eigenbasis": "qr"}),
    ("eigenvalue_corrected", False, {"frequency": 2, "second_moment_carry": "rotate"}),
    (
        "eigenvalue_corrected",
        False,
        {"frequency": 2, "eigenbasis": "qr", "second_moment_carry": "rotate"},
    ),
    ("per_factor", False, {"frequency": 2, "bias_correction": False, "grafting": "adam"}),
    ("per_factor", True, {"frequency": 2, "beta2": 1.0}),
    ("per_factor", False, {"frequency": 2, "eigenbasis": "qr"}),
    ("root_inv", False, {"frequency": 2, "eigenbasis": "qr"}),
    ("root_inv", True, {"frequency": 2, "eigenbasis": "qr"}),
    ("eigendecomposed", False, {"frequency": 2, "eigenbasis": "qr"}),
    ("root_inv", True, {"frequency": 2, "beta1": 0.0}),
    # The momentum's bias correction and the graft scale are applied in the update only.
    ("root_inv", False, {"frequency": 2, "nesterov": True, "grafting": "adam"}),
    ("eigenvalue_corrected", False, {"frequency": 2, "grafting": "adam"}),
    # SOAP's quotient paths: the momentum's Nesterov mix, no momentum (the quotient cannot
    # reuse the rotated gradient), and the parameter-space momentum of grafted SOAP.
    ("eigenvalue_corrected", False, {"frequency": 2, "eigenbasis": "qr", "nesterov": True}),
    ("eigenvalue_corrected", False, {"frequency": 2, "eigenbasis": "qr", "beta1": 0.0}),
    ("eigenvalue_corrected", False, {"frequency": 2, "bias_correction": False, "grafting": "adam"}),
]


@pytest.mark.parametrize(("variant", "kl", "extra"), CASES)
def test_first_steps_match_dense_reference(variant: str, kl: bool, extra: dict) -> None:
    weight, gradients = random_problem(steps=6)
    options = {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "epsilon": 1e-3, **extra}
    expected = reference_trajectory(weight, gradients, variant=variant, kl=kl, **options)
    eigenbasis = options.pop("eigenbasis", "eigh")
    preconditioner: object = VARIANT_NAMES[variant]
    if variant == "eigenvalue_corrected":
        preconditioner = EigenvalueCorrectedConfig(
            eigenbasis=eigenbasis,
            second_moment_carry=options.pop("second_moment_carry", "follow_columns"),
        )
    if variant == "per_factor":
        preconditioner = PerFactorEigenvalueCorrectedConfig(eigenbasis=eigenbasis)
    if variant in ("root_inv", "eigendecomposed") and eigenbasis == "qr":
        config = RootInverseConfig if variant == "root_inv" else EigendecomposedConfig
        preconditioner = config(eigenbasis="qr")
    actual = run_optimizer(
        weight,
        gradients,
        lr=options["lr"],
        betas=(options["beta1"], options["beta2"]),
        epsilon=options["epsilon"],
        preconditioner=preconditioner,
        kl=kl,
        precondition_frequency=options.get("frequency", 1),
        nesterov=options.get("nesterov", False),
        bias_correction=options.get("bias_correction", True),
        grafting=options.get("grafting", "none"),
    )
    for step, (got, want) in enumerate(zip(actual, expected), start=1):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=f"step {step}")


@pytest.mark.parametrize("variant", ["root_inv", "eigendecomposed", "per_factor"])
def test_identity_multiple_factors_give_gradient_over_its_scale(variant: str) -> None:
    # G = c·H with H orthogonal makes G Gᵀ = Gᵀ G = c² I: every factor is c² I, so the first
    # direction is (c² + ε)^{-1/4} G (c² + ε)^{-1/4} = G / √(c² + ε).
    scale, epsilon, lr = 3.0, 0.5, 0.1
    orthogonal = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    gradient = scale * orthogonal
    weight = torch.zeros(4, 4, dtype=torch.float64)
    (after,) = run_optimizer(
        weight,
        [gradient],
        lr=lr,
        betas=(0.9, 0.95),
        epsilon=epsilon,
        preconditioner=VARIANT_NAMES[variant],
        grafting="none",
    )
    torch.testing.assert_close(after, -lr * gradient / (scale**2 + epsilon) ** 0.5)


def test_eigenvalue_corrected_first_update_is_sign_like_in_the_eigenbasis() -> None:
    # Step 1 only measures; step 2 (same gradient): E = G̃² after bias correction, so the
    # direction is Q[G̃/(|G̃| + ε)]Qᵀ, and a diagonal G has the identity as eigenbasis (up to
    # order and signs): the direction is G/(|G| + ε) entrywise.
    gradient = torch.diag(torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64))
    first, after = run_optimizer(
        torch.zeros(3, 3, dtype=torch.float64),
        [gradient, gradient],
        lr=1.0,
        betas=(0.0, 0.9),
        epsilon=0.25,
        preconditioner="eigenvalue_corrected",
        grafting="none",
    )
    expected = -gradient / (gradient.abs() + 0.25)
    expected[gradient == 0] = 0.0
    torch.testing.assert_close(first, torch.zeros(3, 3, dtype=torch.float64))
    torch.testing.assert_close(after, expected)


def test_soap_first_step_measures_and_second_uses_its_eigenbasis() -> None:
    # SOAP (Vyas et al., 2024): step 1 accumulates the factors and installs their eigenbasis
    # without moving the parameters; step 2 is Adam started from scratch in that basis:
    # M = g₂, v = (Qₗᵀ g₂ Qᵣ)², direction Qₗ[(Qₗᵀ g₂ Qᵣ) / (|Qₗᵀ g₂ Qᵣ| + ε)]Qᵣᵀ. Any Adam step
    # at step 1 (or moments measured in the identity basis) changes both steps.
    generator = torch.Generator().manual_seed(5)
    first_gradient, second_gradient = torch.randn(2, 4, 4, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    lr, epsilon = 0.1, 1e-3
    after_first, after_second = run_optimizer(
        weight,
        [first_gradient, second_gradient],
        lr=lr,
        betas=(0.95, 0.95),
        epsilon=epsilon,
        preconditioner="eigenvalue_corrected",
        grafting="none",
    )
    torch.testing.assert_close(after_first, weight, rtol=0, atol=0)
    left = torch.linalg.eigh(first_gradient @ first_gradient.T).eigenvectors
    right = torch.linalg.eigh(first_gradient.T @ first_gradient).eigenvectors
    rotated = left.T @ second_gradient @ right
    direction = left @ (rotated / (rotated.abs() + epsilon)) @ right.T
    torch.testing.assert_close(after_second, weight - lr * direction, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("variant", ["root_inv", "eigendecomposed", "per_factor"])
def test_epsilon_dominated_step_is_gradient_over_fourth_roots(variant: str) -> None:
    # ε ≫ ‖G‖²: each factor's inverse root ≈ ε^{-1/4}, so the step is G/√ε (to O(‖G‖²/ε)).
    weight, (gradient,) = random_problem(steps=1)
    epsilon = 1e8
    (after,) = run_optimizer(
        weight,
        [gradient],
        lr=1.0,
        betas=(0.0, 0.9),
        epsilon=epsilon,
        preconditioner=VARIANT_NAMES[variant],
        grafting="none",
    )
    torch.testing.assert_close(after, weight - gradient / epsilon**0.5, rtol=1e-7, atol=1e-12)


def test_beta2_one_accumulates_a_sum_without_bias_correction() -> None:
    # β₂ = 1, two steps with G₂ = 2 G₁ = 2·c·H (H orthogonal): L = R = (1 + 4)c² I, so the second
    # root-inverse step (β₁ = 0) is 2G₁ / √(5c² + ε).
    c, epsilon = 2.0, 1e-3
    orthogonal = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    first, second = run_optimizer(
        torch.zeros(3, 3, dtype=torch.float64),
        [c * orthogonal, 2 * c * orthogonal],
        lr=1.0,
        betas=(0.0, 1.0),
        epsilon=epsilon,
        grafting="none",
    )
    torch.testing.assert_close(second - first, -2 * c * orthogonal / (5 * c**2 + epsilon) ** 0.5)


def test_three_dimensional_block_uses_one_factor_per_dim() -> None:
    # A (2, 3, 4) tensor: F_i = G_(i) G_(i)ᵀ, exponent 1/6, direction G ×₁ P₁ ×₂ P₂ ×₃ P₃.
    generator = torch.Generator().manual_seed(7)
    gradient = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    param = nn.Parameter(torch.zeros(2, 3, 4, dtype=torch.float64))
    optimizer = Shampoo(
        [param],
        lr=1.0,
        betas=(0.0, 0.9),
        epsilon=1e-2,
        grafting="none",
        max_preconditioner_dim=None,
        factor_dtype=torch.float64,
    )
    param.grad = gradient
    optimizer.step()
    expected = gradient
    for axis in range(3):
        unfolded = gradient.movedim(axis, 0).reshape(gradient.shape[axis], -1)
        factor = unfolded @ unfolded.T  # bias correction cancels (1 − β₂)
        values, vectors = torch.linalg.eigh(factor + 1e-2 * torch.eye(factor.shape[0]))
        root = vectors @ torch.diag(values ** (-1 / 6)) @ vectors.T
        expected = torch.tensordot(root, expected.movedim(axis, 0), dims=1).movedim(0, axis)
    torch.testing.assert_close(param.detach(), -expected)
    assert [f.shape[-1] for f in optimizer.kronecker_factors(param)[0].factors] == [2, 3, 4]
