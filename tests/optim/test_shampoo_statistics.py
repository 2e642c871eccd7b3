"""Shampoo's factor statistics against float64 formulas written here."""

from __future__ import annotations

import pytest
import torch

from kronlab.optim.shampoo.statistics import update_factors_


def unfold(block: torch.Tensor, axis: int) -> torch.Tensor:
    return block.movedim(axis, 0).reshape(block.shape[axis], -1)


@pytest.mark.parametrize("beta", [0.9, 1.0])
@pytest.mark.parametrize("kl", [False, True])
@pytest.mark.parametrize("keep_products", [False, True])
def test_factor_update_matches_definition(beta: float, kl: bool, keep_products: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    gradients = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64)
    roots = None
    if kl:  # some symmetric F_j^{-1/2}, one axis left unpreconditioned
        roots = [None]
        for size in (4, 5):
            x = torch.randn(2, size, size, generator=generator, dtype=torch.float64)
            roots.append(x @ x.mT / size + torch.eye(size, dtype=torch.float64))
    state: dict = {}
    for _ in range(2):
        products = update_factors_(state, gradients, roots, beta, keep_products=keep_products)
    for b in range(2):
        for axis, size in enumerate((3, 4, 5)):
            block = gradients[b]
            if kl:
                for j, root in enumerate(roots):
                    if j != axis and root is not None:
                        block = torch.movedim(
                            torch.tensordot(root[b], block, dims=([1], [j])), 0, j
                        )
            outer = unfold(block, axis) @ unfold(block, axis).T
            if kl:
                outer = outer / (60 // size)
            expected = 2 * outer if beta == 1.0 else (beta * (1 - beta) + (1 - beta)) * outer
            torch.testing.assert_close(state["factors"][axis][b], expected)
            if keep_products:
                torch.testing.assert_close(products[axis][b], outer)
    assert (products is None) == (not keep_products)
