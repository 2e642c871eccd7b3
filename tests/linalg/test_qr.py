import pytest
import torch

from kronlab.linalg import qr_eigenbasis_refresh, rayleigh_quotients

from .test_eigh import random_spd


def test_exact_eigenbasis_is_a_fixed_point():
    matrix = random_spd(6, condition=50)
    values, vectors = torch.linalg.eigh(matrix)
    result = qr_eigenbasis_refresh(matrix, vectors)
    expected_values = values.flip(-1)
    expected_vectors = vectors.flip(-1)
    assert torch.allclose(result.eigenvalues, expected_values, atol=1e-12)
    # sign convention diag(R) >= 0 keeps each eigenvector's sign
    assert torch.allclose(result.eigenvectors, expected_vectors, atol=1e-10)
    assert torch.equal(result.order, torch.arange(5, -1, -1))


def test_iterations_converge_to_eigenvalues():
    matrix = random_spd(8, condition=100)
    start = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64)).Q
    reference = torch.linalg.eigvalsh(matrix).flip(-1)
    errors = []
    for iterations in (1, 10, 200):
        refreshed = qr_eigenbasis_refresh(matrix, start, iterations=iterations)
        errors.append((refreshed.eigenvalues - reference).abs().max().item())
    assert errors[2] < 1e-8 and errors[2] < errors[0]


def test_output_sorted_orthonormal_and_rayleigh_quotients():
    matrix = random_spd(7, (3,), condition=30, dtype=torch.float32)
    start = torch.linalg.qr(torch.randn(3, 7, 7)).Q
    result = qr_eigenbasis_refresh(matrix, start, iterations=2)
    assert (result.eigenvalues.diff(dim=-1) <= 1e-6).all()
    identity = torch.eye(7).expand(3, 7, 7)
    assert torch.allclose(result.eigenvectors.mT @ result.eigenvectors, identity, atol=1e-5)
    quotients = torch.diagonal(
        result.eigenvectors.mT @ matrix @ result.eigenvectors, dim1=-2, dim2=-1
    )
    assert torch.allclose(result.eigenvalues, quotients, atol=1e-5)


def test_order_tracks_columns_of_a_permuted_warm_start():
    matrix = random_spd(5, condition=20)
    _, vectors = torch.linalg.eigh(matrix)  # ascending
    permutation = torch.tensor([3, 0, 4, 1, 2])
    result = qr_eigenbasis_refresh(matrix, vectors[:, permutation])
    # column j of the result came from warm-start column order[j]
    assert torch.allclose(result.eigenvectors, vectors[:, permutation][:, result.order], atol=1e-10)


def test_batched_equals_looped():
    matrices = random_spd(5, (4,), condition=10)
    starts = torch.linalg.qr(torch.randn(4, 5, 5, dtype=torch.float64)).Q
    batched = qr_eigenbasis_refresh(matrices, starts)
    for index in range(4):
        single = qr_eigenbasis_refresh(matrices[index], starts[index])
        assert torch.allclose(batched.eigenvectors[index], single.eigenvectors, atol=1e-12)
        assert torch.equal(batched.order[index], single.order)


def test_stacks_refreshed_as_one_batch_without_concatenation():
    # A list of stacks is the batch of their concatenation; against the SOAP step written from
    # its definition (sort by diag(QᵀAQ), QR of A Q with diag R ≥ 0) in float64.
    matrices = random_spd(5, (5,), condition=30)
    starts = torch.linalg.qr(torch.randn(5, 5, 5, dtype=torch.float64)).Q
    row_major = starts.contiguous()  # a row-major warm start is accepted too
    for exact in (False, True):
        result = qr_eigenbasis_refresh(
            [matrices[:2], matrices[2:]], [row_major[:2], starts[2:]], exact_eigenvalues=exact
        )
        whole = qr_eigenbasis_refresh(matrices, starts, exact_eigenvalues=exact)
        assert torch.allclose(result.eigenvectors, whole.eigenvectors, atol=1e-12)
        assert torch.allclose(result.eigenvalues, whole.eigenvalues, atol=1e-12)
        assert torch.equal(result.order, whole.order)
    quotients = torch.diagonal(starts.mT @ matrices @ starts, dim1=-2, dim2=-1)
    first = quotients.argsort(dim=-1, descending=True)
    q, r = torch.linalg.qr(matrices @ starts.gather(-1, first.unsqueeze(-2).expand_as(starts)))
    expected = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    lean = qr_eigenbasis_refresh(
        [matrices[:2], matrices[2:]], [starts[:2], starts[2:]], exact_eigenvalues=False
    )
    assert torch.allclose(lean.eigenvectors, expected, atol=1e-10)
    with pytest.raises(ValueError, match="one eigenvector stack per matrix stack"):
        qr_eigenbasis_refresh([matrices], [starts, starts])


def test_rayleigh_quotients_definition():
    matrix = random_spd(4)
    basis = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64)).Q
    expected = torch.stack([basis[:, i] @ matrix @ basis[:, i] for i in range(4)])
    assert torch.allclose(rayleigh_quotients(matrix, basis), expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="eigenvectors must have the shape"):
        qr_eigenbasis_refresh(torch.eye(3), torch.eye(4))
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        qr_eigenbasis_refresh(torch.eye(3), torch.eye(3), iterations=0)


def test_warm_start_eigenvalues_skip_the_final_product():
    # exact_eigenvalues=False: SOAP's refresh. The eigenvalues are the warm start's Rayleigh
    # quotients diag(QᵀAQ) sorted descending, and the basis is the orthonormal factor of A Q in
    # that order (diag R ≥ 0) — the same columns as the default, before its final sort.
    matrix = random_spd(6, (2,), condition=40)
    start = torch.linalg.qr(torch.randn(2, 6, 6, dtype=torch.float64)).Q
    result = qr_eigenbasis_refresh(matrix, start, exact_eigenvalues=False)
    quotients = torch.diagonal(start.mT @ matrix @ start, dim1=-2, dim2=-1)
    expected_values, first = quotients.sort(dim=-1, descending=True)
    assert torch.allclose(result.eigenvalues, expected_values, atol=1e-12)
    assert torch.equal(result.order, first)
    sorted_start = start.gather(-1, first.unsqueeze(-2).expand_as(start))
    q, r = torch.linalg.qr(matrix @ sorted_start)
    expected_vectors = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    assert torch.allclose(result.eigenvectors, expected_vectors, atol=1e-10)
    exact = qr_eigenbasis_refresh(matrix, start)
    columns = result.order.argsort(dim=-1).gather(-1, exact.order)  # same columns, re-sorted
    assert torch.allclose(
        exact.eigenvectors, result.eigenvectors.gather(-1, columns.unsqueeze(-2).expand_as(start))
    )
    values, vectors = torch.linalg.eigh(matrix)  # an exact eigenbasis is still a fixed point
    fixed = qr_eigenbasis_refresh(matrix, vectors, exact_eigenvalues=False)
    assert torch.allclose(fixed.eigenvectors, vectors.flip(-1), atol=1e-10)
    assert torch.allclose(fixed.eigenvalues, values.flip(-1), atol=1e-12)
