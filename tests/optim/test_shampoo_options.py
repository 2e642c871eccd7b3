"""Shampoo's shared options: validation, grafting, stacking, vectors, blocking, failures."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kronlab.factors.eigenbasis import DecompositionFailed
from kronlab.groups import LinearWeightBias, PerParameter
from kronlab.optim import SOAP, KLShampoo, Shampoo
from kronlab.optim.shampoo import (
    EigendecomposedConfig,
    EigenvalueCorrectedConfig,
    GraftingConfig,
    PerFactorEigenvalueCorrectedConfig,
    RootInverseConfig,
)


def params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(4, 3))]


@pytest.mark.parametrize(
    ("options", "argument"),
    [
        ({"lr": -1.0}, "lr"),
        ({"eps": -1e-8}, "eps"),
        ({"eps": 0.0}, "eps"),
        ({"betas": (1.2, 0.9)}, r"betas\[0\]"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
        ({"betas": (0.9,)}, "betas"),
        ({"precondition_frequency": 0}, "precondition_frequency"),
        ({"precondition_frequency": 2.5}, "precondition_frequency"),
        ({"start_preconditioning_step": 0}, "start_preconditioning_step"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"preconditioner": "newton"}, "preconditioner"),
        ({"preconditioner": 3}, "preconditioner"),
        ({"grafting": "lion"}, "grafting"),
        ({"kl": True, "preconditioner": "eigenvalue_corrected"}, "kl"),
        ({"kl": True, "preconditioner": RootInverseConfig(exponent_override=0.25)}, "exponent"),
        ({"max_preconditioner_dim": 0}, "max_preconditioner_dim"),
        ({"factor_dtype": torch.float16}, "factor_dtype"),
        ({"vector_preconditioner": "full"}, "vector_preconditioner"),
        ({"max_consecutive_failures": 0}, "max_consecutive_failures"),
    ],
)
def test_bad_arguments_raise_at_construction(options: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=f"Invalid {argument}"):
        Shampoo(params(), **options)


def test_bad_config_fields_raise() -> None:
    with pytest.raises(ValueError, match="Invalid eigenbasis"):
        EigenvalueCorrectedConfig(eigenbasis="svd")  # type: ignore[arg-type]
    for config in (RootInverseConfig, EigendecomposedConfig):
        with pytest.raises(ValueError, match="Invalid eigenbasis"):
            config(eigenbasis="svd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid exponent_override"):
        PerFactorEigenvalueCorrectedConfig(exponent_override=-0.5)
    with pytest.raises(ValueError, match="Invalid factor_beta"):
        EigenvalueCorrectedConfig(factor_beta=1.5)
    with pytest.raises(ValueError, match="Invalid grafting epsilon"):
        GraftingConfig(epsilon=0.0)
    with pytest.raises(ValueError, match="Invalid lr"):
        SOAP(params(), lr=-1)
    with pytest.raises(ValueError, match="Invalid kl"):
        KLShampoo(params(), preconditioner="eigenvalue_corrected")


@pytest.mark.parametrize("method", ["sgd", "adagrad", "rmsprop", "adam"])
def test_grafting_matches_the_grafting_direction_norm_per_block(method: str) -> None:
    # Two blocks (max_preconditioner_dim=3 cuts the 6 rows in two): each block's step has the
    # Frobenius norm of the grafting method's direction on that block, computed here.
    torch.manual_seed(1)
    param = nn.Parameter(torch.randn(6, 3, dtype=torch.float64))
    start = param.detach().clone()
    gradient = torch.randn(6, 3, dtype=torch.float64)
    beta2, epsilon = 0.9, 1e-8
    optimizer = Shampoo(
        [param],
        lr=1.0,
        betas=(0.0, beta2),
        grafting=method,
        max_preconditioner_dim=3,
        merge_dims=False,
        factor_dtype=torch.float64,
    )
    param.grad = gradient
    optimizer.step()
    if method == "sgd":
        grafted = gradient
    elif method == "adagrad":
        grafted = gradient / (gradient.abs() + epsilon)
    elif method == "rmsprop":
        grafted = gradient / (((1 - beta2) * gradient**2).sqrt() + epsilon)
    else:
        grafted = gradient / (gradient.abs() + epsilon)
    step = start - param.detach()
    for rows in (slice(0, 3), slice(3, 6)):
        torch.testing.assert_close(step[rows].norm(), grafted[rows].norm())
    # The direction is Shampoo's, not the grafting method's: its shape differs.
    assert not torch.allclose(step / step.norm(), grafted / grafted.norm(), atol=1e-3)


def test_same_shape_blocks_of_all_parameters_share_one_stack() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 5))
    optimizer = Shampoo(model.parameters(), max_preconditioner_dim=None)
    kronecker = [stack for stack in optimizer.plan.stacks if stack.work.key == "kronecker"]
    assert sorted((s.shape, len(s.slots)) for s in kronecker) == [((5, 8), 1), ((8, 8), 2)]
    vectors = [stack for stack in optimizer.plan.stacks if stack.work.key == "diagonal"]
    assert sorted((s.shape, len(s.slots)) for s in vectors) == [((5,), 1), ((8,), 2)]


def test_decompositions_are_batched_across_stacks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Factors of size 8 from the (8, 8) stack (both axes) and the (5, 8) stack (right axis) go
    # through one eigh call; the size-5 factor through another.
    import kronlab.factors.eigenbasis as eigenbasis

    calls = []
    original = eigenbasis.eigh

    def counting(matrix: torch.Tensor | list[torch.Tensor], **kwargs: object):
        stacks = [matrix] if isinstance(matrix, torch.Tensor) else matrix
        calls.append((sum(s.shape[0] for s in stacks), *stacks[0].shape[1:]))
        return original(matrix, **kwargs)

    monkeypatch.setattr(eigenbasis, "eigh", counting)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 5))
    optimizer = Shampoo(model.parameters(), max_preconditioner_dim=None)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    assert sorted(calls) == [(1, 5, 5), (5, 8, 8)]


def test_vectors_scalars_and_higher_order_tensors() -> None:
    torch.manual_seed(2)
    conv = nn.Parameter(torch.randn(4, 3, 2, 2))
    scalar = nn.Parameter(torch.tensor(1.0))
    bias = nn.Parameter(torch.randn(4))
    optimizer = Shampoo([conv, scalar, bias], lr=1e-2, max_preconditioner_dim=6, verbose_init=False)
    for _ in range(3):
        optimizer.zero_grad()
        (conv.square().sum() + scalar**2 + bias.square().sum()).backward()
        optimizer.step()
    # (4, 3, 2, 2) merges to (4, 3·2=6, 2): one factor per merged dim.
    (block,) = optimizer.kronecker_factors(conv)
    assert block.block_shape == (4, 6, 2)
    assert [f.shape[-1] for f in block.factors] == [4, 6, 2]
    assert optimizer.kronecker_factors(bias) == []
    assert optimizer.block_layout(bias) is None
    described = optimizer.describe()
    assert "4x4 (Dense)" in described and "(diagonal)" in described
    for p in (conv, scalar, bias):
        assert torch.isfinite(p).all()


def test_dense_vector_preconditioner_is_full_matrix_adagrad_direction() -> None:
    # A vector with vector_preconditioner="dense" is one factor: direction (g gᵀ + ε)^{-1/2} g.
    gradient = torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)
    param = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer = Shampoo(
        [param],
        lr=1.0,
        betas=(0.0, 0.9),
        epsilon=0.1,
        grafting="none",
        vector_preconditioner="dense",
        factor_dtype=torch.float64,
    )
    param.grad = gradient
    optimizer.step()
    values, vectors = torch.linalg.eigh(torch.outer(gradient, gradient) + 0.1 * torch.eye(3))
    expected = vectors @ torch.diag(values**-0.5) @ vectors.T @ gradient
    torch.testing.assert_close(param.detach(), -expected)


def test_vector_preconditioner_grafting_uses_the_grafting_direction() -> None:
    param = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer = Shampoo(
        [param], lr=1.0, betas=(0.0, 0.9), grafting="sgd", vector_preconditioner="grafting"
    )
    param.grad = torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)
    optimizer.step()
    torch.testing.assert_close(param.detach(), -param.grad)


def test_linear_weight_and_bias_share_one_preconditioner() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = Shampoo(
        model=model,
        params=None,
        combine_params=(LinearWeightBias(), PerParameter()),
        max_preconditioner_dim=None,
    )
    model(torch.randn(3, 5)).sum().backward()
    optimizer.step()
    (block,) = optimizer.kronecker_factors(model[0].bias)
    assert block.block_shape == (4, 6)


def test_start_preconditioning_step_uses_grafting_until_then() -> None:
    torch.manual_seed(3)
    param = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    gradient = torch.randn(4, 3, dtype=torch.float64)
    optimizer = Shampoo(
        [param],
        lr=1.0,
        betas=(0.0, 0.9),
        grafting="sgd",
        start_preconditioning_step=3,
        merge_dims=False,
        factor_dtype=torch.float64,
    )
    steps = []
    for _ in range(3):
        before = param.detach().clone()
        param.grad = gradient
        optimizer.step()
        steps.append(before - param.detach())
    torch.testing.assert_close(steps[0], gradient)
    torch.testing.assert_close(steps[1], gradient)
    assert not torch.allclose(steps[2], gradient)
    torch.testing.assert_close(steps[2].norm(), gradient.norm())


def test_failed_decomposition_keeps_the_previous_preconditioner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kronlab.factors.eigenbasis as eigenbasis
    from kronlab.linalg.eigh import Eigendecomposition

    param = nn.Parameter(torch.randn(4, 3))
    optimizer = Shampoo([param], lr=1e-2, grafting="none", max_consecutive_failures=2)
    param.grad = torch.randn(4, 3)
    optimizer.step()
    roots = [r.clone() for r in optimizer.kronecker_factors(param)[0].inverse_roots]

    def failing(matrix: torch.Tensor, **kwargs: object) -> Eigendecomposition:
        n = matrix.shape[-1]
        return Eigendecomposition(
            torch.ones(matrix.shape[:-1]),
            torch.eye(n).expand_as(matrix).clone(),
            torch.zeros(matrix.shape[:-2], dtype=torch.bool),
        )

    monkeypatch.setattr(eigenbasis, "eigh", failing)
    param.grad = torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="keeping their previous preconditioner"):
        optimizer.step()
    for kept, old in zip(optimizer.kronecker_factors(param)[0].inverse_roots, roots):
        assert torch.equal(kept, old)
    assert torch.isfinite(param).all()
    param.grad = torch.randn(4, 3)
    with pytest.raises(DecompositionFailed, match="2 times in a row"):
        optimizer.step()


def test_nonfinite_factor_is_never_used() -> None:
    param = nn.Parameter(torch.randn(4, 3))
    optimizer = Shampoo([param], lr=1e-2, preconditioner="eigendecomposed", grafting="adam")
    param.grad = torch.randn(4, 3)
    optimizer.step()
    block = optimizer.state[param]["blocks"][0]
    block["factors"][0][0, 0] = math.inf  # e.g. an overflow
    param.grad = torch.randn(4, 3)
    # the decomposition keeps its previous result; the step, whose state holds the inf, is
    # refused as a whole
    with (
        pytest.warns(RuntimeWarning, match="previous preconditioner"),
        pytest.warns(RuntimeWarning, match="non-finite value produced by the step"),
    ):
        optimizer.step()
    assert torch.isfinite(block["eigenvectors"][0]).all()
    assert torch.isfinite(param).all()


def test_parameter_without_gradient_is_left_alone() -> None:
    used, unused = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(3, 2))
    optimizer = Shampoo([used, unused], lr=1e-2, weight_decay=0.1)
    before = unused.detach().clone()
    used.grad = torch.randn(3, 2)
    optimizer.step()
    assert torch.equal(unused.detach(), before)
