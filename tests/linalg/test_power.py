import pytest
import torch

from kronlab.linalg import power_iteration


def test_converges_to_spectral_norm():
    matrix = torch.randn(20, 12, dtype=torch.float64)
    estimate = power_iteration(matrix, iterations=300)
    reference = torch.linalg.matrix_norm(matrix, ord=2)
    assert torch.allclose(estimate.sigma, reference, rtol=1e-8)


def test_estimate_is_a_lower_bound_and_warm_start_improves():
    matrix = torch.randn(3, 30, 30, dtype=torch.float64)
    reference = torch.linalg.matrix_norm(matrix, ord=2)
    first = power_iteration(matrix, iterations=1)
    assert (first.sigma <= reference + 1e-12).all()
    vector = first.left_vector
    for _ in range(200):
        vector = power_iteration(matrix, vector, iterations=1).left_vector
    warm = power_iteration(matrix, vector, iterations=1)
    assert torch.allclose(warm.sigma, reference, rtol=1e-6)
    assert ((reference - warm.sigma) <= (reference - first.sigma) + 1e-12).all()


def test_batched_equals_looped():
    matrices = torch.randn(4, 6, 9, dtype=torch.float64)
    start = torch.randn(4, 6, dtype=torch.float64)
    batched = power_iteration(matrices, start, iterations=3)
    for index in range(4):
        single = power_iteration(matrices[index], start[index], iterations=3)
        assert torch.allclose(batched.sigma[index], single.sigma)
        assert torch.allclose(batched.left_vector[index], single.left_vector)


def test_bf16_input_and_seeded_generator():
    matrix = torch.randn(8, 8).to(torch.bfloat16)
    a = power_iteration(matrix, generator=torch.Generator().manual_seed(3))
    b = power_iteration(matrix, generator=torch.Generator().manual_seed(3))
    assert a.sigma.dtype == torch.float32 and torch.equal(a.sigma, b.sigma)


def test_bad_arguments():
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        power_iteration(torch.eye(3), iterations=0)
    with pytest.raises(ValueError, match="left_vector must have shape"):
        power_iteration(torch.eye(3), torch.ones(4))
    with pytest.raises(ValueError, match="matrix must have shape"):
        power_iteration(torch.ones(3))
