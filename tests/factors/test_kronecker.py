import torch

from kronlab.factors import (
    from_eigenbasis,
    kronecker_outer,
    kronecker_product_apply,
    mode_product,
    precondition_in_eigenbasis,
    to_eigenbasis,
)
from kronlab.factors.kronecker import unfold


def test_matrix_block_product_is_left_and_right_multiplication():
    blocks = torch.randn(3, 4, 5, dtype=torch.float64)
    left = torch.randn(3, 6, 4, dtype=torch.float64)
    right = torch.randn(3, 2, 5, dtype=torch.float64)
    result = kronecker_product_apply(blocks, [left, right])
    expected = torch.stack([left[i] @ blocks[i] @ right[i].T for i in range(3)])
    assert torch.allclose(result, expected)


def test_three_axis_product_matches_dense_kronecker():
    block = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    matrices = [torch.randn(1, d, d, dtype=torch.float64) for d in (2, 3, 4)]
    result = kronecker_product_apply(block, matrices)
    dense = torch.kron(torch.kron(matrices[0][0], matrices[1][0]), matrices[2][0])
    # row-major vec: (M1 ⊗ M2 ⊗ M3) vec(G)
    assert torch.allclose(result.flatten(), dense @ block.flatten())


def test_shared_matrix_and_identity_axis():
    blocks = torch.randn(2, 3, 4, dtype=torch.float64)
    shared = torch.randn(5, 4, dtype=torch.float64)
    assert torch.allclose(mode_product(blocks, shared, 1), blocks @ shared.T)
    assert torch.equal(kronecker_product_apply(blocks, [None, None]), blocks)


def test_eigenbasis_round_trip():
    blocks = torch.randn(2, 4, 3, dtype=torch.float64)
    q = [torch.linalg.qr(torch.randn(2, d, d, dtype=torch.float64)).Q for d in (4, 3)]
    assert torch.allclose(from_eigenbasis(to_eigenbasis(blocks, q), q), blocks)
    assert torch.allclose(to_eigenbasis(blocks, q)[0], q[0][0].T @ blocks[0] @ q[1][0])


def test_kfac_damped_inverse_equals_dense_solve():
    d_out, d_in, damping = 3, 4, 0.1
    s_root = torch.randn(d_out, d_out, dtype=torch.float64)
    a_root = torch.randn(d_in, d_in, dtype=torch.float64)
    s, a = s_root @ s_root.T, a_root @ a_root.T
    gradient = torch.randn(1, d_out, d_in, dtype=torch.float64)
    lambda_s, q_s = torch.linalg.eigh(s)
    lambda_a, q_a = torch.linalg.eigh(a)
    scaling = 1.0 / (kronecker_outer([lambda_s[None], lambda_a[None]]) + damping)
    result = precondition_in_eigenbasis(gradient, [q_s[None], q_a[None]], scaling)
    dense = torch.kron(s, a) + damping * torch.eye(d_out * d_in, dtype=torch.float64)
    expected = torch.linalg.solve(dense, gradient.flatten())
    assert torch.allclose(result.flatten(), expected)


def test_kronecker_outer_three_vectors():
    vectors = [torch.randn(2, d, dtype=torch.float64) for d in (2, 3, 4)]
    result = kronecker_outer(vectors)
    expected = torch.einsum("bi,bj,bk->bijk", *vectors)
    assert torch.allclose(result, expected)


def _axis_outer_products(blocks):
    """``G_(i) G_(i)ᵀ`` per axis, from the mode-``i`` unfoldings."""
    return [unfold(blocks, axis) @ unfold(blocks, axis).mT for axis in range(blocks.ndim - 1)]


def test_unfoldings_give_the_axis_outer_products():
    blocks = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    products = _axis_outer_products(blocks)
    assert torch.allclose(products[0], torch.einsum("bijk,bljk->bil", blocks, blocks))
    assert torch.allclose(products[1], torch.einsum("bijk,bilk->bjl", blocks, blocks))
    assert torch.allclose(products[2], torch.einsum("bijk,bijl->bkl", blocks, blocks))
    matrix = blocks[:, :, :, 0]
    left, right = _axis_outer_products(matrix)
    assert torch.allclose(left, matrix @ matrix.mT) and torch.allclose(right, matrix.mT @ matrix)


def test_matrix_stack_rotations_and_scale_match_the_definition():
    # Stacks of matrices take two batched matmuls (with from_eigenbasis' scale on the GEMM);
    # bases column-major as LAPACK returns them, or row-major; shared 2-D bases and 3-axis
    # blocks take the mode products. All against per-block float64 definitions.
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    column_major = [
        torch.linalg.qr(torch.randn(3, d, d, generator=generator, dtype=torch.float64)).Q
        for d in (4, 5)
    ]
    row_major = [q.contiguous() for q in column_major]
    assert column_major[0].mT.is_contiguous() and row_major[0].is_contiguous()
    for left, right in (column_major, row_major):
        rotated = to_eigenbasis(blocks, [left, right])
        back = from_eigenbasis(blocks, [left, right], scale=-0.3)
        for i in range(3):
            torch.testing.assert_close(rotated[i], left[i].T @ blocks[i] @ right[i])
            torch.testing.assert_close(back[i], -0.3 * left[i] @ blocks[i] @ right[i].T)
    shared = [q[0] for q in column_major]
    torch.testing.assert_close(
        from_eigenbasis(blocks, shared, scale=2.0), 2.0 * shared[0] @ blocks @ shared[1].T
    )
    cube = torch.randn(1, 2, 3, 4, generator=generator, dtype=torch.float64)
    bases = [torch.linalg.qr(torch.randn(1, d, d, dtype=torch.float64)).Q for d in (2, 3, 4)]
    dense = torch.kron(torch.kron(bases[0][0], bases[1][0]), bases[2][0])
    torch.testing.assert_close(
        from_eigenbasis(cube, bases, scale=0.5).flatten(), 0.5 * dense @ cube.flatten()
    )
