"""Kronecker factor state: accumulation, damped inverse roots, eigenvalue correction and the
amortized, failure-tolerant eigendecomposition, against float64 formulas written here."""

from __future__ import annotations

import warnings

import pytest
import torch

from kronlab.factors.accumulation import (
    accumulate_,
    accumulate_gram_,
    accumulate_square_,
    bias_correction,
)
from kronlab.factors.correction import (
    transport_second_moment,
    update_factor_eigenvalues_,
    update_second_moment_,
)
from kronlab.factors.eigenbasis import DecompositionFailed, refresh_eigenbasis
from kronlab.factors.inverse import damped_inverse_root, damped_inverse_root_


def random_psd(batch: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, size, 2 * size, generator=generator, dtype=torch.float64)
    return x @ x.transpose(-1, -2) / size


@pytest.mark.parametrize(
    ("size", "depth", "beta"),
    [(1030, 256, 0.9), (600, 300, 1.0), (700, 100, 0.9), (300, 300, 0.9)],
)
def test_gram_update_from_its_lower_half_is_the_full_product(
    size: int, depth: int, beta: float
) -> None:
    # F ← β F + w X Xᵀ: split in half twice (1030 → 515 → 257/258), once (600), not at all (a thin
    # X, or d < 512); as a strided view of X (an unfolding along the second axis) too.
    generator = torch.Generator().manual_seed(size)
    rows = torch.randn(1, depth, size, generator=generator, dtype=torch.float64).mT
    start = torch.randn(1, size, size, generator=generator, dtype=torch.float64)
    start = start + start.mT
    weight = 1.0 if beta == 1.0 else 0.3
    factor = accumulate_gram_(start.clone(), rows, beta, weight)
    expected = beta * start + weight * (rows @ rows.mT)
    torch.testing.assert_close(factor, expected, rtol=1e-12, atol=1e-12)
    if size >= 512 and depth >= 256:  # the upper off-diagonal block is the mirrored lower one
        half = size // 2
        assert torch.equal(factor[:, :half, half:], factor[:, half:, :half].mT)


def test_accumulate_ema_and_sum() -> None:
    state = torch.zeros(3, dtype=torch.float64)
    samples = [torch.tensor([1.0, 2.0, 3.0]) * k for k in (1, 2, 3)]
    for sample in samples:
        accumulate_(state, sample.double(), 0.9)
    expected = sum(0.9 ** (3 - t) * 0.1 * samples[t - 1].double() for t in (1, 2, 3))
    torch.testing.assert_close(state, expected)
    torch.testing.assert_close(state / bias_correction(0.9, 3), expected / (1 - 0.9**3))
    total = torch.zeros(3, dtype=torch.float64)
    for sample in samples:
        accumulate_(total, sample.double(), 1.0)
    torch.testing.assert_close(total, sum(s.double() for s in samples))
    assert bias_correction(1.0, 5) == 1.0 and bias_correction(0.9, 2, enabled=False) == 1.0
    squares, square_sum = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for sample in samples:
        accumulate_square_(squares, sample.double(), 0.9)
        accumulate_square_(square_sum, sample.double(), 1.0)
    torch.testing.assert_close(
        squares, sum(0.9 ** (3 - t) * 0.1 * samples[t - 1].double() ** 2 for t in (1, 2, 3))
    )
    torch.testing.assert_close(square_sum, sum(s.double() ** 2 for s in samples))


def test_damped_inverse_root_matches_definition() -> None:
    matrices = random_psd(3, 5, seed=1)
    values, vectors = torch.linalg.eigh(matrices)
    root = damped_inverse_root(values, vectors, epsilon=1e-3, exponent=0.25, scale=1 / 0.3)
    # Definition: X with X^{-4} = A/0.3 + εI, checked by raising X to the -4th power.
    damped = matrices / 0.3 + 1e-3 * torch.eye(5, dtype=torch.float64)
    inverse_fourth = torch.linalg.matrix_power(torch.linalg.inv(root), 4)
    torch.testing.assert_close(inverse_fourth, damped, rtol=1e-8, atol=1e-10)


def test_in_place_damped_inverse_root_matches_definition() -> None:
    # The X Xᵀ form (X = Q diag(s^{1/2}), built in the eigenvectors' memory) against the same
    # definition as above; it consumes the eigenvectors it is given.
    matrices = random_psd(3, 5, seed=3)
    values, vectors = torch.linalg.eigh(matrices)
    root = damped_inverse_root_(values, vectors.clone(), epsilon=1e-3, exponent=0.25, scale=2.0)
    damped = matrices * 2.0 + 1e-3 * torch.eye(5, dtype=torch.float64)
    inverse_fourth = torch.linalg.matrix_power(torch.linalg.inv(root), 4)
    torch.testing.assert_close(inverse_fourth, damped, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(root, root.mT, rtol=0, atol=1e-14)


def test_second_moment_and_factor_eigenvalue_updates() -> None:
    generator = torch.Generator().manual_seed(2)
    gradient = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    left = torch.linalg.qr(torch.randn(2, 4, 4, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(2, 3, 3, generator=generator, dtype=torch.float64))[0]
    rotated = left.transpose(-1, -2) @ gradient @ right
    moment = torch.ones(2, 4, 3, dtype=torch.float64)
    update_second_moment_(moment, rotated, 0.8)
    torch.testing.assert_close(moment, 0.8 + 0.2 * rotated**2)

    outer = gradient @ gradient.transpose(-1, -2)
    ema = torch.full((2, 4), 0.5, dtype=torch.float64)
    update_factor_eigenvalues_(ema, left, outer, 0.8)
    expected = 0.8 * 0.5 + 0.2 * torch.diagonal(
        left.transpose(-1, -2) @ outer @ left, dim1=-2, dim2=-1
    )
    torch.testing.assert_close(ema, expected)


def test_transported_second_moment_follows_permuted_columns() -> None:
    generator = torch.Generator().manual_seed(3)
    old = torch.linalg.qr(torch.randn(1, 4, 4, generator=generator, dtype=torch.float64))[0]
    permutation = torch.tensor([2, 0, 3, 1])
    moment = torch.rand(1, 4, 3, generator=generator, dtype=torch.float64)
    right_old = torch.linalg.qr(torch.randn(1, 3, 3, generator=generator, dtype=torch.float64))[0]
    right_new = right_old[..., [1, 2, 0]]
    carried = transport_second_moment(moment, [old[..., permutation], right_new], [old, right_old])
    torch.testing.assert_close(carried, moment[:, permutation][:, :, [1, 2, 0]])
    torch.testing.assert_close(carried.sum(), moment.sum())


@pytest.mark.parametrize("method", ["eigh", "qr"])
def test_refresh_keeps_previous_basis_where_decomposition_fails(method: str) -> None:
    factors = random_psd(3, 4, seed=4)
    first = refresh_eigenbasis(factors, None, None, torch.zeros(3, dtype=torch.long))
    assert first.ok.all() and (first.failures == 0).all()
    torch.testing.assert_close(
        first.eigenvectors @ torch.diag_embed(first.eigenvalues) @ first.eigenvectors.mT,
        factors,
    )
    broken = factors.clone()
    broken[1, 0, 0] = float("nan")
    failures = first.failures
    for attempt in (1, 2):
        with pytest.warns(RuntimeWarning, match="keeping their previous preconditioner"):
            refreshed = refresh_eigenbasis(
                broken,
                first.eigenvectors,
                first.eigenvalues,
                failures,
                method=method,
                max_consecutive_failures=3,
            )
        failures = refreshed.failures
        assert refreshed.ok.tolist() == [True, False, True]
        assert failures.tolist() == [0, attempt, 0]
        torch.testing.assert_close(refreshed.eigenvectors[1], first.eigenvectors[1])
        assert torch.isfinite(refreshed.eigenvectors).all()
    with pytest.raises(DecompositionFailed, match="3 times in a row"):
        refresh_eigenbasis(
            broken, first.eigenvectors, first.eigenvalues, failures, max_consecutive_failures=3
        )
    # A success resets the counter.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        healed = refresh_eigenbasis(factors, first.eigenvectors, first.eigenvalues, failures)
    assert (healed.failures == 0).all()


def test_qr_refresh_converges_to_the_eigenbasis() -> None:
    factors = random_psd(2, 5, seed=5)
    exact_values = torch.linalg.eigvalsh(factors)
    start = torch.linalg.qr(factors + 0.3 * random_psd(2, 5, seed=6))[0]
    refreshed = refresh_eigenbasis(
        factors, start, None, torch.zeros(2, dtype=torch.long), method="qr"
    )
    assert not torch.allclose(refreshed.eigenvalues.sort(dim=-1).values, exact_values)
    for _ in range(200):
        refreshed = refresh_eigenbasis(
            factors, refreshed.eigenvectors, None, refreshed.failures, method="qr"
        )
    torch.testing.assert_close(
        refreshed.eigenvalues.sort(dim=-1).values, exact_values, rtol=1e-6, atol=1e-9
    )


@pytest.mark.parametrize("method", ["eigh", "qr"])
def test_refresh_without_column_tracking_or_exact_eigenvalues(method: str) -> None:
    # What a caller opts out of is the only difference: same basis, identity column order.
    factors = random_psd(2, 5, seed=7)
    start = torch.linalg.qr(factors + 0.3 * random_psd(2, 5, seed=8))[0]
    failures = torch.zeros(2, dtype=torch.long)
    full = refresh_eigenbasis(factors, start, None, failures, method=method)
    lean = refresh_eigenbasis(factors, start, None, failures, method=method, track_columns=False)
    torch.testing.assert_close(lean.eigenvectors, full.eigenvectors)
    torch.testing.assert_close(lean.eigenvalues, full.eigenvalues)
    assert torch.equal(lean.order, torch.arange(5).expand(2, 5))
    basis_only = refresh_eigenbasis(
        factors, start, None, failures, method=method, exact_eigenvalues=False
    )
    # eigh is unaffected; QR returns the same columns, in the order they were orthonormalized.
    quotients = torch.diagonal(
        basis_only.eigenvectors.mT @ factors @ basis_only.eigenvectors, dim1=-2, dim2=-1
    )
    resorted = quotients.argsort(dim=-1, descending=method == "qr")
    torch.testing.assert_close(
        basis_only.eigenvectors.gather(-1, resorted.unsqueeze(-2).expand(2, 5, 5)),
        full.eigenvectors,
    )
    torch.testing.assert_close(basis_only.order.gather(-1, resorted), full.order)
