"""Structured factor matrices against dense float64 matrices built from the definitions here."""

import math

import pytest
import torch

from kronlab.optim.sirf_structures import make_structure

DIM = 7  # not a multiple of the block sizes below, so the padded last block is exercised
SPECS = [
    "dense",
    "diagonal",
    "block_diagonal:3",
    "block_diagonal:7",
    "block_diagonal:1",
    "lower_triangular",
    "upper_triangular",
]


def structure_mask(spec: str, dim: int) -> torch.Tensor:
    """Which entries of a dim × dim matrix the structure may hold."""
    if spec == "dense":
        return torch.ones(dim, dim, dtype=torch.bool)
    if spec == "diagonal":
        return torch.eye(dim, dtype=torch.bool)
    if spec.startswith("block_diagonal"):
        block = int(spec.split(":")[1])
        which = torch.arange(dim) // block
        return which[:, None] == which[None, :]
    lower = torch.ones(dim, dim).tril().bool()
    return lower if spec == "lower_triangular" else lower.T


def reference_projection(spec: str, symmetric: torch.Tensor) -> torch.Tensor:
    """Π onto the structure's Lie algebra: triangles collect both off-diagonal halves."""
    if spec in ("lower_triangular", "upper_triangular"):
        doubled = 2 * symmetric - torch.diag(symmetric.diagonal())
        return doubled * structure_mask(spec, symmetric.shape[0])
    return symmetric * structure_mask(spec, symmetric.shape[0])


def random_structured(spec: str, dim: int = DIM):
    """A random matrix of the structure: (its storage, its dense float64 matrix)."""
    structure = make_structure(spec, dim)
    dense = torch.randn(dim, dim, dtype=torch.float64) * structure_mask(spec, dim)
    if spec == "diagonal":
        storage = dense.diagonal().clone()
    elif spec.startswith("block_diagonal"):
        block = structure.block_size
        padded = torch.zeros(structure.padded_dim, structure.padded_dim, dtype=torch.float64)
        padded[:dim, :dim] = dense
        storage = torch.stack(
            [
                padded[i * block : (i + 1) * block, i * block : (i + 1) * block]
                for i in range(structure.num_blocks)
            ]
        )
    else:
        storage = dense.clone()
    assert torch.equal(structure.to_dense(storage), dense)
    return structure, storage, dense


def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.tensordot(matrix, tensor, dims=([1], [axis])).movedim(0, axis)


@pytest.mark.parametrize("spec", SPECS)
def test_identity_zeros_and_describe(spec):
    structure = make_structure(spec, DIM)
    eye = structure.identity(torch.float64)
    assert torch.equal(structure.to_dense(eye), torch.eye(DIM, dtype=torch.float64))
    assert torch.equal(
        structure.to_dense(structure.zeros(torch.float64)),
        torch.zeros(DIM, DIM, dtype=torch.float64),
    )
    assert structure.describe().startswith(f"{DIM}x{DIM} (") and "Matrix" in structure.describe()
    assert structure.trace(eye).item() == DIM


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    "shape_axis", [((DIM,), 0), ((DIM, 4), 0), ((3, DIM), 1), ((2, DIM, 3), 1), ((2, 3, DIM), 2)]
)
@pytest.mark.parametrize("transpose", [False, True])
def test_apply_along_axis_matches_dense(spec, shape_axis, transpose):
    shape, axis = shape_axis
    structure, storage, dense = random_structured(spec)
    tensor = torch.randn(shape, dtype=torch.float64)
    expected = mode_product(tensor, dense.T if transpose else dense, axis)
    result = structure.apply(storage, tensor, axis, transpose=transpose)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS)
def test_projections_of_outer_products_and_gram(spec):
    structure, storage, dense = random_structured(spec)
    columns = torch.randn(DIM, 5, dtype=torch.float64)
    outer = columns @ columns.T
    torch.testing.assert_close(
        structure.to_dense(structure.project_outer(columns)), reference_projection(spec, outer)
    )
    torch.testing.assert_close(
        structure.to_dense(structure.project(outer)), reference_projection(spec, outer)
    )
    torch.testing.assert_close(
        structure.to_dense(structure.gram(storage)), reference_projection(spec, dense.T @ dense)
    )
    # accumulate: beta·out + alpha·Π(XXᵀ), in place
    _, out, out_dense = random_structured(spec)
    result = structure.accumulate_outer_(out, columns, alpha=0.3, beta=0.7)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(
        structure.to_dense(out), 0.7 * out_dense + 0.3 * reference_projection(spec, outer)
    )


@pytest.mark.parametrize("spec", SPECS)
def test_matmul_reductions_and_diagonal_shift(spec):
    structure, left, left_dense = random_structured(spec)
    _, right, right_dense = random_structured(spec)
    product = structure.to_dense(structure.matmul(left, right))
    torch.testing.assert_close(product, left_dense @ right_dense)
    assert torch.all(product[~structure_mask(spec, DIM)] == 0)
    torch.testing.assert_close(structure.trace(left), left_dense.trace())
    torch.testing.assert_close(structure.frobenius_norm(left), torch.linalg.matrix_norm(left_dense))
    torch.testing.assert_close(structure.max_abs(left), left_dense.abs().max())
    structure.add_to_diagonal_(left, -0.25)
    torch.testing.assert_close(
        structure.to_dense(left), left_dense - 0.25 * torch.eye(DIM, dtype=torch.float64)
    )
    # padding stays zero, so the storage norm is still the matrix norm
    torch.testing.assert_close(
        structure.frobenius_norm(left), torch.linalg.matrix_norm(structure.to_dense(left))
    )


def test_diagonal_projection_never_forms_the_square_matrix():
    structure = make_structure("diagonal", 100_000)
    columns = torch.randn(100_000, 3)
    # A dense 100000² float32 matrix would need 40 GB; the diagonal needs 400 kB.
    torch.testing.assert_close(structure.project_outer(columns), (columns**2).sum(1))


def test_block_size_is_capped_at_the_dimension():
    structure = make_structure("block_diagonal:64", 5)
    assert structure.block_size == 5 and structure.describe() == "5x5 (BlockDiagonalMatrix[5])"
    assert make_structure("block_diagonal", 40).block_size == 16


@pytest.mark.parametrize(
    "spec", ["Dense", "diag", "block_diagonal:0", "block_diagonal:x", "dense:3", 3]
)
def test_bad_structure_names_raise(spec):
    with pytest.raises(ValueError, match="Invalid"):
        make_structure(spec, 4)


def test_bad_dimension_raises():
    with pytest.raises(ValueError, match="dim"):
        make_structure("dense", 0)
    assert math.isclose(make_structure("dense", 1).identity(torch.float32).item(), 1.0)
