"""Curvature.from_optimizer through the optimizer's ``kronecker_factors(param)`` interface.

The fake optimizer below exposes blocks the way ``kronlab.optim.Shampoo`` does (``factors``,
``eigenvectors``, ``eigenvalues``, ``second_moment``, bias corrections); the reference is a dense
solve written from the definition.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

from kronlab.attribution import Curvature

from .attribution_models import Conv1D


class Block(NamedTuple):
    block_shape: tuple[int, ...]
    factors: list[torch.Tensor]
    eigenvectors: list[torch.Tensor] | None
    eigenvalues: list[torch.Tensor] | None
    second_moment: torch.Tensor | None
    factor_bias_correction: float
    eigenvalue_bias_correction: float


class FakeShampoo:
    """Sums ``F_i = Σ G_(i) G_(i)ᵀ`` per dim of each parameter set's block (bias as a last
    column if given; size-1 dims dropped, as Shampoo does)."""

    def __init__(self, blocks: list[tuple[nn.Parameter, ...]], variant: str = "root_inv") -> None:
        self.blocks, self.variant = blocks, variant
        self.shapes = []
        for block in blocks:
            shape = list(block[0].shape)
            shape[-1] += len(block) - 1
            self.shapes.append(tuple(size for size in shape if size != 1))
        self.statistics = [
            [torch.zeros(n, n, dtype=torch.float64) for n in shape] for shape in self.shapes
        ]
        self.second_moments = [
            torch.rand(shape, dtype=torch.float64) + 0.5 for shape in self.shapes
        ]

    def accumulate(self, gradients: list[torch.Tensor]) -> None:
        for stats, shape, gradient in zip(self.statistics, self.shapes, gradients):
            gradient = gradient.reshape(shape)
            for axis, factor in enumerate(stats):
                unfolded = gradient.movedim(axis, 0).reshape(shape[axis], -1)
                factor += unfolded @ unfolded.T

    def kronecker_factors(self, param: torch.Tensor) -> list[Block]:
        owners = [i for i, params in enumerate(self.blocks) if any(p is param for p in params)]
        if not owners:
            raise ValueError("the parameter is not optimized by this optimizer")
        index = owners[0]
        factors, second_moment = self.statistics[index], self.second_moments[index]
        # Bias corrections of 2 and 4: the curvature must divide them out.
        scaled = [2 * f for f in factors]
        if self.variant == "root_inv":
            return [Block(self.shapes[index], scaled, None, None, None, 2.0, 1.0)]
        vectors = [torch.linalg.eigh(f)[1] for f in factors]
        moment = 4 * second_moment if self.variant == "soap" else None
        return [Block(self.shapes[index], scaled, vectors, None, moment, 2.0, 4.0)]


def _dense_inverse(left, right, damping):
    """(L ⊗ R + λI)⁻¹ in row-major vec order."""
    dense = torch.kron(left, right)
    return torch.linalg.inv(dense + damping * torch.eye(len(dense), dtype=torch.float64))


@pytest.mark.parametrize("variant", ["root_inv", "eigendecomposed"])
def test_shampoo_factors_give_the_damped_kronecker_solve(variant: str) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False)).double()
    optimizer = FakeShampoo([(model[0].weight, model[0].bias), (model[2].weight,)], variant)
    for _ in range(6):
        optimizer.accumulate(
            [torch.randn(4, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)]
        )
    curvature = Curvature.from_optimizer(optimizer, model)
    assert curvature.method == "optimizer" and list(curvature.modules) == ["0", "2"]
    grads = {
        "0": torch.randn(4, 4, dtype=torch.float64),
        "2": torch.randn(2, 4, dtype=torch.float64),
    }
    applied = curvature.inverse_hvp(grads, damping=0.7)
    for name, (left, right) in zip(("0", "2"), optimizer.statistics):
        expected = (_dense_inverse(left, right, 0.7) @ grads[name].flatten()).reshape(
            grads[name].shape
        )
        torch.testing.assert_close(applied[name], expected)


def test_soap_eigenbasis_and_second_moment_are_used_as_ekfac() -> None:
    model = nn.Sequential(nn.Linear(3, 4)).double()
    optimizer = FakeShampoo([(model[0].weight, model[0].bias)], "soap")
    optimizer.accumulate([torch.randn(4, 4, dtype=torch.float64)])
    curvature = Curvature.from_optimizer(optimizer, model)
    left_vectors, right_vectors = (torch.linalg.eigh(f)[1] for f in optimizer.statistics[0])
    basis = torch.kron(left_vectors, right_vectors)
    dense = basis @ torch.diag(optimizer.second_moments[0].flatten()) @ basis.T
    grad = torch.randn(4, 4, dtype=torch.float64)
    expected = torch.linalg.solve(dense + 0.2 * torch.eye(16, dtype=torch.float64), grad.flatten())
    torch.testing.assert_close(curvature.inverse_hvp({"0": grad}, 0.2)["0"], expected.reshape(4, 4))


def test_conv1d_layout_and_weight_only_bias() -> None:
    model = nn.Sequential(Conv1D(4, 3)).double()  # weight (in=3, out=4): factors swap sides
    optimizer = FakeShampoo([(model[0].weight,)])
    optimizer.accumulate([torch.randn(3, 4, dtype=torch.float64)])
    curvature = Curvature.from_optimizer(optimizer, model)
    right, left = optimizer.statistics[0]  # rows of the Conv1D weight are its inputs
    # The bias column gets its own direction with the mean input eigenvalue.
    padded = torch.block_diag(right, right.trace().reshape(1, 1) / 3)
    grad = torch.randn(4, 4, dtype=torch.float64)
    expected = (_dense_inverse(left, padded, 0.3) @ grad.flatten()).reshape(4, 4)
    torch.testing.assert_close(curvature.inverse_hvp({"0": grad}, 0.3)["0"], expected)


def test_optimizer_without_factors_or_with_missing_modules() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="exposes no kronecker_factors"):
        Curvature.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    optimizer = FakeShampoo([(model[0].weight, model[0].bias)])
    optimizer.accumulate([torch.randn(4, 4, dtype=torch.float64)])
    with pytest.raises(ValueError, match="no single Kronecker block in the weight's own dims"):
        Curvature.from_optimizer(optimizer, model)
    assert list(Curvature.from_optimizer(optimizer, model, modules=["0"]).modules) == ["0"]


@pytest.mark.parametrize("variant", ["root_inv", "soap"])
@pytest.mark.parametrize("layer", ["conv2d", "conv1d"])
def test_convolution_input_side_is_the_kronecker_product_of_its_dims(
    variant: str, layer: str
) -> None:
    # Both weights are one block (3, 2, 2): (out, C=1 dropped, kh, kw) and (out, C, k).
    conv = (
        nn.Conv2d(1, 3, (2, 2), bias=False) if layer == "conv2d" else nn.Conv1d(2, 3, 2, bias=False)
    )
    model = nn.Sequential(conv).double()
    optimizer = FakeShampoo([(model[0].weight,)], variant)
    for _ in range(4):
        optimizer.accumulate([torch.randn(model[0].weight.shape, dtype=torch.float64)])
    curvature = Curvature.from_optimizer(optimizer, model)
    out_factor, height_factor, width_factor = optimizer.statistics[0]
    grad = torch.randn(3, 4, dtype=torch.float64)
    if variant == "root_inv":
        dense = torch.kron(out_factor, torch.kron(height_factor, width_factor))
    else:
        vectors = [torch.linalg.eigh(f)[1] for f in optimizer.statistics[0]]
        basis = torch.kron(vectors[0], torch.kron(vectors[1], vectors[2]))
        dense = basis @ torch.diag(optimizer.second_moments[0].flatten()) @ basis.T
    expected = torch.linalg.solve(dense + 0.4 * torch.eye(12, dtype=torch.float64), grad.flatten())
    torch.testing.assert_close(curvature.inverse_hvp({"0": grad}, 0.4)["0"], expected.reshape(3, 4))


@pytest.mark.parametrize("preconditioner", ["root_inv", "eigenvalue_corrected"])
def test_real_shampoo_and_soap_factors_give_the_dense_curvature(preconditioner: str) -> None:
    """End to end with kronlab.optim.Shampoo: the curvature is the optimizer's own factors."""
    from kronlab.groups import LinearWeightBias, PerParameter
    from kronlab.optim import Shampoo

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    optimizer = Shampoo(
        None,
        model=model,
        lr=1e-2,
        preconditioner=preconditioner,
        merge_dims=False,
        factor_dtype=torch.float64,
        combine_params=(LinearWeightBias(), PerParameter()),
    )
    inputs, targets = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    for _ in range(4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    curvature = Curvature.from_optimizer(optimizer, model)
    grads = {
        "0": torch.randn(4, 6, dtype=torch.float64),
        "2": torch.randn(3, 5, dtype=torch.float64),
    }
    applied = curvature.inverse_hvp(grads, damping=0.05)
    for name, layer in (("0", model[0]), ("2", model[2])):
        (block,) = optimizer.kronecker_factors(layer.weight)
        if preconditioner == "root_inv":
            left, right = (f.double() / block.factor_bias_correction for f in block.factors)
            dense = torch.kron(left, right)
        else:
            basis = torch.kron(*(q.double() for q in block.eigenvectors))
            moment = block.second_moment.double() / block.eigenvalue_bias_correction
            dense = basis @ torch.diag(moment.flatten()) @ basis.T
        expected = torch.linalg.solve(
            dense + 0.05 * torch.eye(len(dense), dtype=torch.float64), grads[name].flatten()
        )
        torch.testing.assert_close(applied[name], expected.reshape(grads[name].shape))
