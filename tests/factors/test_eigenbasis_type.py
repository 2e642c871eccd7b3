"""KroneckerEigenbasis and Damping against dense float64 matrices built from the definitions."""

import pytest
import torch

from kronlab.factors import Damping, KroneckerEigenbasis


def _spd(d: int, generator: torch.Generator) -> torch.Tensor:
    root = torch.randn(d, d, dtype=torch.float64, generator=generator)
    return root @ root.T + 0.1 * torch.eye(d, dtype=torch.float64)


def _matrix_power(matrix: torch.Tensor, exponent: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.pow(exponent)) @ vectors.T


def _factors(sizes=(3, 4), seed=0):
    generator = torch.Generator().manual_seed(seed)
    factors = [_spd(d, generator) for d in sizes]
    pairs = [torch.linalg.eigh(f) for f in factors]
    basis = KroneckerEigenbasis(
        tuple(vectors for _, vectors in pairs), tuple(values for values, _ in pairs)
    )
    return factors, basis, generator


def _dense_apply(matrix: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``matrix @ vec(G)`` (row-major vec) for every block of a stack."""
    flat = blocks.reshape(blocks.shape[0], -1)
    return (flat @ matrix.T).reshape(blocks.shape)


@pytest.mark.parametrize("kind", ["absolute", "relative_to_mean"])
def test_damped_inverse_is_dense_solve(kind):
    (s, a), basis, generator = _factors()
    blocks = torch.randn(5, 3, 4, dtype=torch.float64, generator=generator)
    hessian = torch.kron(s, a)
    value = 0.3
    delta = value if kind == "absolute" else value * torch.linalg.eigvalsh(hessian).mean()
    dense = hessian + delta * torch.eye(12, dtype=torch.float64)
    expected = _dense_apply(torch.linalg.inv(dense), blocks)
    result = basis.damped_inverse(blocks, Damping(kind, value))
    torch.testing.assert_close(result, expected)


def test_damped_power_relative_to_mean_is_dense_power():
    (s, a), basis, generator = _factors((2, 3, 4)[:2])
    blocks = torch.randn(2, 2, 3, dtype=torch.float64, generator=generator)
    hessian = torch.kron(s, a)
    delta = 0.05 * torch.linalg.eigvalsh(hessian).mean()
    dense = _matrix_power(hessian + delta * torch.eye(6, dtype=torch.float64), -0.5)
    result = basis.damped_power(blocks, -0.5, Damping("relative_to_mean", 0.05))
    torch.testing.assert_close(result, _dense_apply(dense, blocks))


@pytest.mark.parametrize("kind", ["per_factor", "per_factor_absolute"])
def test_factorwise_power_is_kronecker_of_damped_factor_powers(kind):
    factors, basis, generator = _factors((3, 2, 4))
    blocks = torch.randn(2, 3, 2, 4, dtype=torch.float64, generator=generator)
    value, exponent = 0.2, -0.25
    eye = [torch.eye(f.shape[0], dtype=torch.float64) for f in factors]
    deltas = [
        value if kind == "per_factor_absolute" else value * torch.linalg.eigvalsh(f).mean()
        for f in factors
    ]
    powers = [_matrix_power(f + d * i, exponent) for f, d, i in zip(factors, deltas, eye)]
    dense = torch.kron(torch.kron(powers[0], powers[1]), powers[2])
    damping = Damping(kind, value)
    torch.testing.assert_close(
        basis.damped_power(blocks, exponent, damping), _dense_apply(dense, blocks)
    )
    for matrix, expected in zip(basis.factor_powers(exponent, damping), powers):
        torch.testing.assert_close(matrix, expected)


def test_stacked_eigenbasis_applies_each_block_its_own_factors():
    generator = torch.Generator().manual_seed(1)
    left = torch.stack([_spd(3, generator) for _ in range(4)])
    right = torch.stack([_spd(2, generator) for _ in range(4)])
    (lv, lq), (rv, rq) = torch.linalg.eigh(left), torch.linalg.eigh(right)
    basis = KroneckerEigenbasis((lq, rq), (lv, rv))
    blocks = torch.randn(4, 3, 2, dtype=torch.float64, generator=generator)
    damping = Damping("per_factor_absolute", 1e-3)
    result = basis.damped_power(blocks, -0.25, damping)
    for i in range(4):
        eye_l, eye_r = torch.eye(3, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
        expected = (
            _matrix_power(left[i] + 1e-3 * eye_l, -0.25)
            @ blocks[i]
            @ _matrix_power(right[i] + 1e-3 * eye_r, -0.25)
        )
        torch.testing.assert_close(result[i], expected)
    assert basis.eigenvalue_tensor().shape == (4, 3, 2)
    torch.testing.assert_close(basis.eigenvalue_tensor()[2], torch.outer(lv[2], rv[2]))


def test_corrected_eigenvalues_and_identity_axis():
    generator = torch.Generator().manual_seed(2)
    q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=generator)).Q
    corrected = torch.rand(3, 4, dtype=torch.float64, generator=generator) + 0.1
    basis = KroneckerEigenbasis((q, None), corrected=corrected)
    blocks = torch.randn(2, 3, 4, dtype=torch.float64, generator=generator)
    # H = (Q ⊗ I) diag(vec Λ) (Q ⊗ I)ᵀ, from the definition
    rotation = torch.kron(q.contiguous(), torch.eye(4, dtype=torch.float64))
    hessian = rotation @ torch.diag(corrected.flatten()) @ rotation.T
    delta = 0.1 * corrected.mean()
    expected = _dense_apply(
        torch.linalg.inv(hessian + delta * torch.eye(12, dtype=torch.float64)), blocks
    )
    torch.testing.assert_close(basis.damped_inverse(blocks, Damping()), expected)
    torch.testing.assert_close(basis.from_eigenbasis(basis.to_eigenbasis(blocks)), blocks)
    assert basis.eigenvalue_tensor() is corrected
    with pytest.raises(ValueError, match="without factor eigenvalues"):
        basis.factor_powers(-0.5, Damping("per_factor", 0.1))


def test_unstacked_single_block_and_negative_round_off_clamped():
    values = torch.tensor([-1e-18, 2.0], dtype=torch.float64)
    basis = KroneckerEigenbasis((torch.eye(2, dtype=torch.float64),), (values,))
    result = basis.damped_power(
        torch.ones(2, dtype=torch.float64), -0.5, Damping("per_factor_absolute", 1.0)
    )
    torch.testing.assert_close(result, torch.tensor([1.0, 3.0**-0.5], dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"kind": "relative"},
            ValueError,
            r"Invalid damping kind: 'relative' \(allowed: 'absolute'",
        ),
        (
            {"value": -0.1},
            ValueError,
            r"Invalid damping value: -0.1 \(allowed: a finite number >= 0\)",
        ),
        ({"value": float("inf")}, ValueError, r"Invalid damping value: inf"),
        ({"value": "0.1"}, TypeError, r"Invalid damping value: '0.1'"),
        ({"value": True}, TypeError, r"Invalid damping value: True"),
    ],
)
def test_bad_damping_is_refused_naming_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        Damping(**kwargs)


def test_bad_eigenbasis_is_refused():
    q = torch.eye(2)
    with pytest.raises(ValueError, match="neither eigenvalues nor corrected"):
        KroneckerEigenbasis((q, q))
    with pytest.raises(ValueError, match="Invalid eigenvalues: 1 spectra for 2"):
        KroneckerEigenbasis((q, q), (torch.ones(2),))
    basis = KroneckerEigenbasis((q, q), (torch.ones(2), torch.ones(2)))
    with pytest.raises(ValueError, match="Invalid damping kind: 'per_factor' for the damped"):
        basis.damped_eigenvalues(Damping("per_factor", 0.1))
