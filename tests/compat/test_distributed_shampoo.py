"""Distributed Shampoo's names and its per-factor step order (PR #264), against float64
transcriptions of the pull request's rules."""

from __future__ import annotations

import pytest
import torch

from kronlab.compat import distributed_shampoo as ds
from kronlab.optim.shampoo import PerFactorEigenvalueCorrectedConfig, Shampoo

from .training import mse_losses

STEPS = 6


def _gradients(shape: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(STEPS)]


def _kl_inverse(eigenvalues, eigenvectors, correction, epsilon):
    """``F^{-1}`` from the per-factor EMA; the identity while its eigenvalues are all zero."""
    if bool((eigenvalues == 0).all()):
        return torch.eye(len(eigenvalues), dtype=torch.float64)
    return eigenvectors @ torch.diag(1.0 / (eigenvalues / correction + epsilon)) @ eigenvectors.T


def _reference_per_factor(
    weight, gradients, *, lr, beta1, beta2, epsilon, frequency, start, kl
) -> torch.Tensor:
    """The PR's step, written out: factors and ``E_k`` from this step's outer products (``E_k``
    in the current basis, zero-initialised, no reordering), refresh ``Q_k`` on due steps, then
    precondition the bias-corrected momentum with the new ``Q_k``."""
    weight = weight.clone()
    rows, columns = weight.shape
    factors = [
        torch.zeros(rows, rows, dtype=torch.float64),
        torch.zeros(columns, columns, dtype=torch.float64),
    ]
    vectors = [torch.eye(rows, dtype=torch.float64), torch.eye(columns, dtype=torch.float64)]
    values = [torch.zeros(rows, dtype=torch.float64), torch.zeros(columns, dtype=torch.float64)]
    momentum = torch.zeros_like(weight)
    weight_factor = 1.0 if beta2 == 1.0 else 1.0 - beta2
    for step, gradient in enumerate(gradients, start=1):
        if kl:
            previous = 1.0 if beta2 == 1.0 else 1.0 - beta2 ** (step - 1)
            left_inverse = _kl_inverse(values[0], vectors[0], previous, epsilon)
            right_inverse = _kl_inverse(values[1], vectors[1], previous, epsilon)
            products = [
                gradient @ right_inverse @ gradient.T / columns,
                gradient.T @ left_inverse @ gradient / rows,
            ]
        else:
            products = [gradient @ gradient.T, gradient.T @ gradient]
        for axis in range(2):
            factors[axis] = beta2 * factors[axis] + weight_factor * products[axis]
            measured = torch.diagonal(vectors[axis].T @ products[axis] @ vectors[axis])
            values[axis] = beta2 * values[axis] + weight_factor * measured
        if step == start or (step >= start and step % frequency == 0):
            vectors = [torch.linalg.eigh(factor).eigenvectors for factor in factors]
        momentum = beta1 * momentum + (1 - beta1) * gradient
        filtered = momentum / (1 - beta1**step)
        correction = 1.0 if beta2 == 1.0 else 1.0 - beta2**step
        exponent = 0.5 if kl else 0.25
        left_scale, right_scale = ((v / correction + epsilon) ** -exponent for v in values)
        rotated = vectors[0].T @ filtered @ vectors[1]
        direction = vectors[0] @ (rotated * torch.outer(left_scale, right_scale)) @ vectors[1].T
        weight = weight - lr * direction
    return weight


def _run(optimizer_factory, weight: torch.Tensor, gradients: list[torch.Tensor]) -> torch.Tensor:
    param = torch.nn.Parameter(weight.clone())
    optimizer = optimizer_factory([param])
    for gradient in gradients:
        param.grad = gradient.clone()
        optimizer.step()
    return param.detach()


@pytest.mark.parametrize("kl", [False, True])
@pytest.mark.parametrize("frequency", [1, 3])
def test_kronlab_distributed_shampoo_order_matches_the_pull_request(
    kl: bool, frequency: int
) -> None:
    # Square: a refresh of a rank-deficient factor has no unique null-space basis, so the
    # reference and the optimizer could both be right and still differ.
    weight = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gradients = _gradients((5, 5))
    options = dict(lr=0.1, beta1=0.9, beta2=0.95, epsilon=1e-3, frequency=frequency, start=1)
    expected = _reference_per_factor(weight, gradients, kl=kl, **options)
    result = _run(
        lambda params: Shampoo(
            params,
            lr=0.1,
            betas=(0.9, 0.95),
            epsilon=1e-3,
            preconditioner=PerFactorEigenvalueCorrectedConfig(step_order="distributed_shampoo"),
            kl=kl,
            grafting="none",
            precondition_frequency=frequency,
            start_preconditioning_step=1,
            merge_dims=False,
            factor_dtype=torch.float64,
        ),
        weight,
        gradients,
    )
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "config",
    [
        ds.PerFactorEigenvalueCorrectedShampooPreconditionerConfig(
            factor_matrix_dtype=torch.float64
        ),
        ds.PerFactorEigenvalueCorrectedKLShampooPreconditionerConfig(
            factor_matrix_dtype=torch.float64
        ),
    ],
)
@pytest.mark.parametrize("frequency", [1, 3])
def test_compat_per_factor_step_matches_the_pull_request(config, frequency: int) -> None:
    """Distributed Shampoo's defaults (betas (0.9, 1.0): summed factors, no β₂ correction)."""
    weight = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    gradients = _gradients((4, 4), seed=3)
    expected = _reference_per_factor(
        weight,
        gradients,
        lr=0.01,
        beta1=0.9,
        beta2=1.0,
        epsilon=1e-6,
        frequency=frequency,
        start=1,
        kl=config.kl,
    )
    result = _run(
        lambda params: ds.DistributedShampoo(
            params,
            lr=0.01,
            epsilon=1e-6,
            precondition_frequency=frequency,
            start_preconditioning_step=1,
            max_preconditioner_dim=4,  # keeps the 4x4 block unmerged
            preconditioner_config=config,
        ),
        weight,
        gradients,
    )
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "config",
    [
        ds.DefaultShampooConfig,
        ds.EigendecomposedShampooPreconditionerConfig(),
        ds.DefaultEigenvalueCorrectedShampooConfig,
        ds.DefaultSOAPConfig,
        ds.PerFactorEigenvalueCorrectedShampooPreconditionerConfig(),
        ds.RootInvKLShampooPreconditionerConfig(),
        ds.EigendecomposedKLShampooPreconditionerConfig(),
        ds.PerFactorEigenvalueCorrectedKLShampooPreconditionerConfig(
            amortized_computation_config=ds.QREigendecompositionConfig(),
            num_tolerated_failed_amortized_computations=0,
        ),
        ds.RootInvShampooPreconditionerConfig(
            inverse_exponent_override={1: 0.5, 2: {0: 0.3, 1: 0.3}}
        ),
    ],
)
def test_the_test_suite_configuration_trains(config) -> None:
    """The optimizer factory of Distributed Shampoo's own tests, with only the import changed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optimizer = ds.DistributedShampoo(
        model.parameters(),
        lr=0.01,
        betas=(0.9, 1.0),
        epsilon=1e-8,
        momentum=0.0,
        weight_decay=0.0,
        max_preconditioner_dim=8,
        precondition_frequency=1,
        start_preconditioning_step=2,
        use_decoupled_weight_decay=True,
        grafting_config=ds.AdaGradGraftingConfig(epsilon=1e-8),
        preconditioner_config=config,
    )
    inputs, targets = torch.randn(32, 6), torch.randn(32, 2)
    losses = mse_losses(model, optimizer, inputs, targets, steps=5)
    assert losses[-1] < losses[0]


def test_unsupported_options_are_refused_by_name() -> None:
    param = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="momentum"):
        ds.DistributedShampoo([param], momentum=0.9)
    with pytest.raises(ValueError, match="inverse_exponent_override"):
        ds.RootInvShampooPreconditionerConfig(inverse_exponent_override={2: {0: 0.25, 1: 0.5}})
    with pytest.raises(ValueError, match="num_tolerated_failed_amortized_computations"):
        ds.EigendecomposedShampooPreconditionerConfig(
            num_tolerated_failed_amortized_computations=-1
        )


def test_inverse_exponent_override_applies_per_order() -> None:
    vector, matrix = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 3))
    optimizer = ds.DistributedShampoo(
        [vector, matrix],
        preconditioner_config=ds.RootInvShampooPreconditionerConfig(
            inverse_exponent_override={2: 0.125}
        ),
    )
    exponents = {
        len(group["params"][0].shape): group["preconditioner"].exponent_override
        for group in optimizer.param_groups
    }
    assert exponents == {1: None, 2: 0.125}
