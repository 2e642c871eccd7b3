import pytest
import torch

from kronlab.linalg import NEWTON_SCHULZ_COEFFICIENTS, newton_schulz


def scalar_band(name: str, smallest: float) -> tuple[float, float]:
    """Where the odd polynomial iteration sends σ ∈ [smallest, 1], iterated in float64."""
    coefficients = NEWTON_SCHULZ_COEFFICIENTS[name]
    sigma = torch.logspace(
        torch.log10(torch.tensor(smallest)).item(), 0, 20001, dtype=torch.float64
    )
    for step in range(coefficients.default_steps):
        a, b, c = coefficients.for_step(step)
        sigma = a * sigma + b * sigma**3 + c * sigma**5
    return sigma.min().item(), sigma.max().item()


def matrix_with_singular_values(m: int, n: int, singular_values: torch.Tensor) -> torch.Tensor:
    u = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64)).Q[:, : len(singular_values)]
    v = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64)).Q[:, : len(singular_values)]
    return (u * singular_values) @ v.T


@pytest.mark.parametrize("name", sorted(NEWTON_SCHULZ_COEFFICIENTS))
@pytest.mark.parametrize("shape", [(16, 16), (12, 32), (40, 10)])
def test_singular_values_within_band(name, shape):
    m, n = shape
    rank = min(m, n)
    # after Frobenius normalization every σ is >= 0.05 / ‖σ‖ ≳ 1e-2
    singular_values = torch.linspace(0.05, 1.0, rank, dtype=torch.float64)
    matrix = matrix_with_singular_values(m, n, singular_values)
    smallest = (singular_values.min() / singular_values.norm()).item()
    low, high = scalar_band(name, smallest)
    result = newton_schulz(matrix.float(), coefficients=name)
    assert result.shape == matrix.shape and result.dtype == torch.float32
    computed = torch.linalg.svdvals(result.double())
    assert computed.min() >= low - 2e-3 and computed.max() <= high + 2e-3
    declared_low, declared_high = NEWTON_SCHULZ_COEFFICIENTS[name].band
    assert declared_low <= low and high <= declared_high


def test_converged_iteration_gives_polar_factor():
    matrix = matrix_with_singular_values(10, 6, torch.linspace(0.2, 1.0, 6, dtype=torch.float64))
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    result = newton_schulz(matrix, steps=40, coefficients="cubic")
    assert torch.allclose(result, u @ vh, atol=1e-8)


def test_one_step_matches_definition():
    matrix = torch.randn(5, 7, dtype=torch.float64)
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix / (torch.linalg.matrix_norm(matrix) + 1e-7)
    gram = x @ x.T
    expected = a * x + (b * gram + c * gram @ gram) @ x
    assert torch.allclose(newton_schulz(matrix, steps=1), expected, atol=1e-12)


def test_tall_input_is_transpose_of_wide():
    matrix = torch.randn(9, 4, dtype=torch.float64)
    assert torch.allclose(newton_schulz(matrix), newton_schulz(matrix.T).T, atol=1e-12)


def test_batched_equals_looped():
    matrices = torch.randn(2, 3, 6, 8)
    batched = newton_schulz(matrices)
    for i in range(2):
        for j in range(3):
            assert torch.allclose(batched[i, j], newton_schulz(matrices[i, j]), atol=1e-5)


def test_bf16_runs_in_bf16_and_stays_in_band():
    matrix = matrix_with_singular_values(32, 64, torch.linspace(0.1, 1.0, 32, dtype=torch.float64))
    result = newton_schulz(matrix.to(torch.bfloat16))
    assert result.dtype == torch.bfloat16
    computed = torch.linalg.svdvals(result.double())
    assert computed.min() > 0.5 and computed.max() < 1.35


def test_custom_schedule_and_errors():
    matrix = torch.randn(4, 4, dtype=torch.float64)
    assert torch.allclose(
        newton_schulz(matrix, coefficients=((3.4445, -4.7750, 2.0315),) * 5),
        newton_schulz(matrix, steps=5),
    )
    with pytest.raises(ValueError, match="Invalid ns_coefficients"):
        newton_schulz(matrix, coefficients="septic")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        newton_schulz(matrix, steps=0)
    with pytest.raises(ValueError, match="coefficients must be"):
        newton_schulz(matrix, coefficients=((1.0, 2.0),))
    with pytest.raises(ValueError, match="matrix must have shape"):
        newton_schulz(torch.randn(4))


def test_zero_matrix_stays_zero():
    assert torch.equal(newton_schulz(torch.zeros(3, 5)), torch.zeros(3, 5))
