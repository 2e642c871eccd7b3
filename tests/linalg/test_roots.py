import pytest
import torch

from kronlab.linalg import coupled_newton_inverse_root, inverse_root_from_eigh, matrix_inverse_root

from .test_eigh import random_spd


def reference_inverse_root(matrix: torch.Tensor, root: float, epsilon: float) -> torch.Tensor:
    """(A + εI)^{-1/root} in float64 from numpy-free definition: eigendecomposition."""
    damped = matrix.double() + epsilon * torch.eye(matrix.shape[-1], dtype=torch.float64)
    values, vectors = torch.linalg.eigh(damped)
    return (vectors * values.pow(-1.0 / root).unsqueeze(-2)) @ vectors.mT


@pytest.mark.parametrize("root", [1, 2, 4, 1.5])
def test_power_identity(root):
    matrix = random_spd(8, (2,), condition=1e2)
    inverse_root = matrix_inverse_root(matrix, root)
    # (A^{-1/r})^r · A = I, checked through the eigenvalues of the symmetric result
    values, vectors = torch.linalg.eigh(inverse_root)
    powered = (vectors * values.pow(root).unsqueeze(-2)) @ vectors.mT
    assert torch.allclose(
        powered @ matrix, torch.eye(8, dtype=torch.float64).expand(2, 8, 8), atol=1e-9
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_reference_with_epsilon(dtype):
    matrix = random_spd(10, (3,), condition=1e4, dtype=dtype)
    result = matrix_inverse_root(matrix, 4, epsilon=1e-3)
    assert result.dtype == dtype
    reference = reference_inverse_root(matrix, 4, 1e-3)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(result.double(), reference, rtol=tolerance, atol=tolerance)


def test_epsilon_dominated_case_is_scaled_identity():
    matrix = torch.full((5, 5), 1e-9, dtype=torch.float64)
    result = matrix_inverse_root(matrix, 2, epsilon=1.0)
    assert torch.allclose(result, torch.eye(5, dtype=torch.float64), atol=1e-8)


def test_ill_conditioned_input_stays_finite():
    matrix = random_spd(16, condition=1e12, dtype=torch.float32)
    result = matrix_inverse_root(matrix, 2)
    assert torch.isfinite(result).all()


def test_pseudo_inverse_drops_null_space():
    basis, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    spectrum = torch.tensor([4.0, 9.0, 16.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    matrix = (basis * spectrum) @ basis.T
    result = matrix_inverse_root(matrix, 2, pseudo_inverse=True)
    expected_spectrum = torch.tensor([0.5, 1 / 3, 0.25, 0.0, 0.0, 0.0], dtype=torch.float64)
    expected = (basis * expected_spectrum) @ basis.T
    assert torch.allclose(result, expected, atol=1e-8)


def test_pseudo_inverse_relative_threshold():
    matrix = torch.diag(torch.tensor([1.0, 1e-3, 1e-8], dtype=torch.float64))
    kept = matrix_inverse_root(matrix, 1, pseudo_inverse=True, rank_rtol=1e-4)
    assert torch.allclose(kept.diagonal(), torch.tensor([1.0, 1e3, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("root", [1, 2, 4])
def test_coupled_newton_matches_eigh(root):
    matrix = random_spd(9, (2,), condition=1e2)
    newton = matrix_inverse_root(matrix, root, epsilon=1e-6, method="newton")
    reference = reference_inverse_root(matrix, root, 1e-6)
    assert torch.allclose(newton, reference, rtol=1e-8, atol=1e-8)


def test_coupled_newton_float32():
    matrix = random_spd(9, condition=1e2, dtype=torch.float32)
    newton = coupled_newton_inverse_root(matrix, 4)
    assert torch.allclose(
        newton.double(), reference_inverse_root(matrix, 4, 0.0), rtol=1e-3, atol=1e-4
    )


def test_nonfinite_matrix_gives_nan_to_detect():
    matrices = random_spd(4, (2,), dtype=torch.float32)
    matrices[0, 0, 0] = float("nan")
    result = matrix_inverse_root(matrices, 2)
    assert torch.isnan(result[0]).all() and torch.isfinite(result[1]).all()


def test_bf16_input_computed_in_float32():
    matrix = random_spd(5, dtype=torch.bfloat16)
    assert matrix_inverse_root(matrix, 2).dtype == torch.float32


def test_from_eigh_matches_definition():
    values = torch.tensor([[1.0, 4.0, 16.0]], dtype=torch.float64)
    vectors = torch.eye(3, dtype=torch.float64).unsqueeze(0)
    result = inverse_root_from_eigh(values, vectors, 2)
    assert torch.allclose(result[0].diagonal(), torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"root": 0}, "root must be > 0"),
        ({"root": -2}, "root must be > 0"),
        ({"root": 2, "epsilon": -1.0}, "epsilon must be >= 0"),
        ({"root": 2, "method": "svd"}, "method must be"),
        ({"root": 2, "method": "newton", "pseudo_inverse": True}, "pseudo_inverse"),
        ({"root": 1.5, "method": "newton"}, "integer root"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        matrix_inverse_root(torch.eye(3), **kwargs)


def test_non_square_rejected():
    with pytest.raises(ValueError, match="shape"):
        matrix_inverse_root(torch.zeros(3, 4), 2)
