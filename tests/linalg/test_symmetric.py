"""symmetric_product against the float64 full product written in the test."""

from __future__ import annotations

import pytest
import torch

from kronlab.linalg.symmetric import symmetric_product

F64 = torch.float64


def symmetric_stack(batch, size, generator):
    matrices = torch.randn(batch, size, size, dtype=F64, generator=generator)
    return (matrices + matrices.mT) / 2


@pytest.mark.parametrize("size", [1, 6, 7, 12])
@pytest.mark.parametrize("min_split", [1, 1000])  # split into halves / multiplied whole
def test_matches_the_full_product_for_symmetric_products(size, min_split):
    generator = torch.Generator().manual_seed(0)
    root = torch.randn(3, size, 5, dtype=F64, generator=generator)
    q, e = symmetric_stack(3, size, generator), symmetric_stack(3, size, generator)
    cases = [(root, root.mT, root @ root.mT), (q, q, q @ q), (e @ q, e, e @ q @ e)]
    for left, right, expected in cases:
        for symmetrize in (False, True):
            product = symmetric_product(left, right, symmetrize=symmetrize, min_split=min_split)
            torch.testing.assert_close(product, expected, rtol=1e-12, atol=1e-12)
            if symmetrize or min_split == 1:  # halves: the off-diagonal blocks are mirrored
                assert torch.equal(
                    product[:, size // 2 :, : size // 2], product[:, : size // 2, size // 2 :].mT
                )
            if symmetrize:
                assert torch.equal(product, product.mT)


def test_float32_halves_are_as_accurate_as_the_full_product():
    generator = torch.Generator().manual_seed(1)
    root = torch.randn(2, 300, 400, dtype=F64, generator=generator)
    expected = root @ root.mT
    full = (root.float() @ root.float().mT).double()
    halves = symmetric_product(root.float(), root.float().mT).double()
    assert (halves - expected).abs().max() <= 2 * (full - expected).abs().max()


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="expected stacks"):
        symmetric_product(torch.zeros(3, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="must be square"):
        symmetric_product(torch.zeros(1, 3, 4), torch.zeros(1, 4, 2))


@pytest.mark.parametrize("size", [6, 7])
@pytest.mark.parametrize("symmetrize", [False, True])
def test_traced_product_is_one_graph_and_equals_the_eager_one(size, symmetrize):
    """Under torch.compile the halves are joined without ``out=`` views (which Dynamo cannot
    trace): no graph break, and the eager result bit for bit."""
    generator = torch.Generator().manual_seed(2)
    left = torch.randn(3, size, 5, dtype=F64, generator=generator)
    right = torch.randn(3, 5, size, dtype=F64, generator=generator)

    def product(a, b):
        return symmetric_product(a, b, symmetrize=symmetrize, min_split=1)

    torch._dynamo.reset()
    traced = torch.compile(product, backend="eager", fullgraph=True)(left, right)
    assert torch.equal(traced, product(left, right))
