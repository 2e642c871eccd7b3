import pytest
import torch

from kronlab.linalg import eigh


def random_spd(n: int, batch: tuple[int, ...] = (), condition: float = 10.0, dtype=torch.float64):
    q, _ = torch.linalg.qr(torch.randn(*batch, n, n, dtype=torch.float64))
    spectrum = torch.logspace(
        0, -torch.log10(torch.tensor(condition)).item(), n, dtype=torch.float64
    )
    return ((q * spectrum.unsqueeze(-2)) @ q.transpose(-1, -2)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_and_orthogonality(dtype):
    matrix = random_spd(12, (3,), condition=1e3, dtype=dtype)
    result = eigh(matrix)
    assert result.ok.all() and result.eigenvalues.dtype == dtype
    reconstructed = (
        result.eigenvectors * result.eigenvalues.unsqueeze(-2)
    ) @ result.eigenvectors.mT
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(reconstructed, matrix, atol=tolerance)
    identity = torch.eye(12, dtype=dtype)
    assert torch.allclose(
        result.eigenvectors.mT @ result.eigenvectors, identity, atol=tolerance * 10
    )
    assert (result.eigenvalues.diff(dim=-1) >= 0).all()  # ascending


def test_batched_equals_looped():
    matrices = random_spd(7, (4,))
    batched = eigh(matrices)
    for index, matrix in enumerate(matrices):
        single = eigh(matrix)
        assert torch.allclose(batched.eigenvalues[index], single.eigenvalues, atol=1e-12)
        # eigenvectors are unique up to sign for distinct eigenvalues
        assert torch.allclose(
            (batched.eigenvectors[index] * single.eigenvectors).sum(0).abs(),
            torch.ones(7, dtype=torch.float64),
            atol=1e-10,
        )


def test_rank_deficient_input():
    basis = torch.randn(10, 3, dtype=torch.float64)
    matrix = basis @ basis.T  # rank 3
    result = eigh(matrix)
    assert result.ok
    assert torch.allclose(result.eigenvalues[:7], torch.zeros(7, dtype=torch.float64), atol=1e-12)
    expected = torch.linalg.eigvalsh(basis.T @ basis)
    assert torch.allclose(result.eigenvalues[7:], expected, rtol=1e-10)


def test_nonfinite_matrix_is_reported_not_returned_as_nan():
    matrices = random_spd(5, (3,), dtype=torch.float32)
    matrices[1, 2, 3] = float("nan")
    matrices[2, 0, 0] = float("inf")
    result = eigh(matrices)
    assert result.ok.tolist() == [True, False, False]
    assert torch.isfinite(result.eigenvalues).all() and torch.isfinite(result.eigenvectors).all()
    assert torch.equal(result.eigenvectors[1], torch.eye(5))
    reference = torch.linalg.eigvalsh(matrices[0].double()).float()
    assert torch.allclose(result.eigenvalues[0], reference, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_upcast(dtype):
    matrix = random_spd(6, dtype=dtype)
    result = eigh(matrix)
    assert result.eigenvalues.dtype == torch.float32
    reference = torch.linalg.eigvalsh(matrix.double())
    assert torch.allclose(result.eigenvalues.double(), reference, atol=1e-5)


def test_float64_option():
    result = eigh(random_spd(4, dtype=torch.float32), float64=True)
    assert result.eigenvalues.dtype == torch.float64


def test_convergence_failure_falls_back(monkeypatch):
    calls = []
    real = torch.linalg.eigh

    def flaky(matrix, **options):
        calls.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real(matrix, **options)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    matrix = random_spd(4, dtype=torch.float32)
    result = eigh(matrix)
    assert calls == [torch.float32, torch.float64]
    # the float64 retry is transparent: results keep the working dtype of the input
    assert result.ok and result.eigenvalues.dtype == torch.float32


def test_single_matrix_failure_does_not_poison_batch(monkeypatch):
    real = torch.linalg.eigh
    matrices = random_spd(4, (3,))
    bad = matrices[1].clone()

    def fails_on_bad(matrix, **options):
        if matrix.ndim == 3 or torch.equal(matrix, bad):
            raise torch.linalg.LinAlgError("did not converge")
        return real(matrix, **options)

    monkeypatch.setattr(torch.linalg, "eigh", fails_on_bad)
    result = eigh(matrices)
    assert result.ok.tolist() == [True, False, True]
    assert torch.allclose(result.eigenvalues[2], torch.linalg.eigvalsh(matrices[2]))


@pytest.mark.parametrize("shape", [(3,), (3, 4), (2, 3, 4)])
def test_non_square_input_is_rejected(shape):
    with pytest.raises(ValueError, match="matrix must have shape"):
        eigh(torch.zeros(shape))


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        eigh(torch.eye(3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reads_only_the_lower_triangle_and_leaves_the_input_untouched(dtype):
    # The decomposition runs in a copy of the input; the upper triangle must never be read.
    lower = random_spd(6, (2,), condition=1e2, dtype=torch.float64)
    matrix = lower.clone()
    upper = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    matrix[:, upper] = 1e3  # garbage above the diagonal
    matrix = matrix.to(dtype)
    before = matrix.clone()
    result = eigh(matrix)
    assert torch.equal(matrix, before)
    expected = torch.linalg.eigvalsh(lower)  # float64, from the definition's symmetric matrix
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(result.eigenvalues.double(), expected, atol=tolerance, rtol=0)
    reconstructed = (
        result.eigenvectors * result.eigenvalues.unsqueeze(-2)
    ) @ result.eigenvectors.mT
    torch.testing.assert_close(reconstructed.double(), lower, atol=tolerance * 10, rtol=0)


def test_sequence_of_stacks_is_the_batch_of_their_concatenation():
    # Several (B_i, n, n) stacks decompose as one batch; a non-finite member is reported in
    # its slot and its neighbours are unaffected; the inputs are untouched.
    first, second = random_spd(5, (2,), condition=1e2), random_spd(5, (3,), condition=1e3)
    second[1, 0, 0] = float("nan")
    before = [first.clone(), second.clone()]
    result = eigh([first, second])
    assert result.ok.tolist() == [True, True, True, False, True]
    assert torch.equal(first, before[0])
    torch.testing.assert_close(second, before[1], equal_nan=True, rtol=0, atol=0)
    for index, matrix in enumerate([*first, *second]):
        if index == 3:
            continue
        expected = torch.linalg.eigvalsh(matrix)
        torch.testing.assert_close(result.eigenvalues[index], expected, atol=1e-12, rtol=0)
        vectors = result.eigenvectors[index]
        torch.testing.assert_close(
            (vectors * result.eigenvalues[index]) @ vectors.mT, matrix, atol=1e-12, rtol=0
        )
    with pytest.raises(ValueError, match="same n"):
        eigh([first, random_spd(4, (1,))])


def test_failed_in_place_attempt_is_retried_from_the_input(monkeypatch):
    # The first (in-place) attempt overwrites its buffer before failing, as LAPACK may; the
    # retry must start again from the caller's matrices, not from that buffer.
    real = torch.linalg.eigh

    def overwriting_then_failing(matrix, **options):
        if "out" in options:
            options["out"][1].fill_(float("nan"))
            raise torch.linalg.LinAlgError("did not converge")
        return real(matrix, **options)

    monkeypatch.setattr(torch.linalg, "eigh", overwriting_then_failing)
    stacks = [random_spd(4, (2,), dtype=torch.float32), random_spd(4, (1,), dtype=torch.float32)]
    result = eigh(stacks)
    assert result.ok.all()
    expected = torch.linalg.eigvalsh(torch.cat(stacks).double())
    torch.testing.assert_close(result.eigenvalues.double(), expected, atol=1e-5, rtol=0)
