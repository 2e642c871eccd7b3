"""Curvature.from_optimizer through the documented kronecker_factors() interface.

The fake optimizers here keep Shampoo's statistics ``L = Σ G Gᵀ``, ``R = Σ Gᵀ G`` and SOAP's
eigenbasis second moment; the reference is a dense solve written from the definition.
"""

from __future__ import annotations

import pytest
import torch
from attribution_models import Conv1D
from torch import nn

from kronlab.attribution import Curvature, OptimizerFactors


class FakeShampoo:
    """Accumulates L and R per parameter block in the parameter's own layout."""

    def __init__(self, blocks: list[tuple[nn.Parameter, ...]], soap: bool = False) -> None:
        self.blocks, self.soap = blocks, soap
        self.statistics: list[list[torch.Tensor]] = []
        for block in blocks:
            rows, columns = block[0].shape[0], block[0].shape[1] + (len(block) - 1)
            self.statistics.append(
                [
                    torch.zeros(rows, rows, dtype=torch.float64),
                    torch.zeros(columns, columns, dtype=torch.float64),
                ]
            )

    def accumulate(self, gradients: list[torch.Tensor]) -> None:
        for stats, gradient in zip(self.statistics, gradients):
            stats[0] += gradient @ gradient.T
            stats[1] += gradient.T @ gradient
        # SOAP's second moment in the eigenbasis: any positive (rows, columns) table will do.
        self.second_moments = [
            torch.rand(left.shape[0], right.shape[0], dtype=torch.float64) + 0.5
            for left, right in self.statistics
        ]

    def kronecker_factors(self) -> list[OptimizerFactors]:
        result = []
        for block, (left, right), second_moment in zip(
            self.blocks, self.statistics, self.second_moments
        ):
            if not self.soap:
                result.append(OptimizerFactors(block, factor_matrices=(left, right)))
                continue
            left_vectors, right_vectors = torch.linalg.eigh(left)[1], torch.linalg.eigh(right)[1]
            result.append(
                OptimizerFactors(
                    block,
                    eigenvectors=(left_vectors, right_vectors),
                    corrected_eigenvalues=second_moment,
                )
            )
        return result


def _dense_inverse(left_or_vectors, right, damping):
    """(L ⊗ R + λI)⁻¹ in row-major vec order."""
    dense = torch.kron(left_or_vectors, right)
    return torch.linalg.inv(dense + damping * torch.eye(len(dense), dtype=torch.float64))


def test_shampoo_factors_give_the_damped_kronecker_solve() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False)).double()
    optimizer = FakeShampoo([(model[0].weight, model[0].bias), (model[2].weight,)])
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
    optimizer = FakeShampoo([(model[0].weight, model[0].bias)], soap=True)
    optimizer.accumulate([torch.randn(4, 4, dtype=torch.float64)])
    (factors,) = optimizer.kronecker_factors()
    curvature = Curvature.from_optimizer(optimizer, model)
    left_vectors, right_vectors = factors.eigenvectors
    basis = torch.kron(left_vectors, right_vectors)
    dense = basis @ torch.diag(factors.corrected_eigenvalues.flatten()) @ basis.T
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
    with pytest.raises(ValueError, match="no two-factor Kronecker preconditioner for modules"):
        Curvature.from_optimizer(optimizer, model)
    assert list(Curvature.from_optimizer(optimizer, model, modules=["0"]).modules) == ["0"]
