import subprocess
import sys

import pytest
import torch

from kronlab.linalg import random_projection, seed_from_identifier


def test_same_identifier_same_matrix_different_identifier_different():
    a = random_projection("layer.0/left", (8, 32))
    b = random_projection("layer.0/left", (8, 32))
    c = random_projection("layer.0/right", (8, 32))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_identical_in_another_process():
    code = (
        "import torch; from kronlab.linalg import random_projection;"
        "torch.manual_seed(123);"
        "print(*(random_projection('blocks.3.mlp/left', (4, 16), kind=kind).sum().item().hex()"
        " for kind in ('normal', 'orthogonal')))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    torch.manual_seed(7)  # the global RNG state must not matter
    here = " ".join(
        random_projection("blocks.3.mlp/left", (4, 16), kind=kind).sum().item().hex()
        for kind in ("normal", "orthogonal")
    )
    assert other == here


def test_global_rng_untouched():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    random_projection("x", (3, 3))
    assert torch.equal(torch.rand(1), before)


def test_rademacher_entries_and_scaling():
    matrix = random_projection("r", (16, 100))
    assert torch.allclose(matrix.abs(), torch.full_like(matrix, 0.25))


@pytest.mark.parametrize("kind", ["rademacher", "normal", "orthogonal"])
def test_johnson_lindenstrauss_norm_preservation(kind):
    vectors = torch.randn(200, 256, dtype=torch.float64)
    ratios = []
    for index in range(20):
        projection = random_projection(f"jl/{index}", (64, 256), kind=kind, dtype=torch.float64)
        ratios.append((vectors @ projection.T).norm(dim=1) ** 2 / vectors.norm(dim=1) ** 2)
    ratios = torch.stack(ratios)
    assert abs(ratios.mean().item() - 1.0) < 0.02  # unbiased
    assert ratios.std().item() < 0.3  # concentrated: ~ sqrt(2/p) = 0.18


def test_orthogonal_rows_are_orthonormal_up_to_the_scale():
    # P = √(d/p) Uᵀ with orthonormal columns U, so P Pᵀ = (d/p) I; at p = d, PᵀP = I exactly.
    matrix = random_projection("o", (24, 96), kind="orthogonal", dtype=torch.float64)
    torch.testing.assert_close(matrix @ matrix.T, 4.0 * torch.eye(24, dtype=torch.float64))
    square = random_projection("o", (16, 16), kind="orthogonal", dtype=torch.float64)
    torch.testing.assert_close(square.T @ square, torch.eye(16, dtype=torch.float64))
    again = random_projection("o", (24, 96), kind="orthogonal", dtype=torch.float64)
    assert torch.equal(matrix, again)


def test_orthogonal_projection_is_unbiased_and_less_noisy_than_iid():
    # E[PᵀP] = I, and the error of ⟨Px, Py⟩ has about (d - p)/(d + 2) of the i.i.d. variance.
    d, p, draws = 64, 32, 60
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 40, d, generator=generator, dtype=torch.float64)
    exact = (x * y).sum(1)
    gram = torch.zeros(d, d, dtype=torch.float64)
    errors = {}
    for kind in ("orthogonal", "rademacher"):
        squared = []
        for index in range(draws):
            matrix = random_projection(f"u/{index}", (p, d), kind=kind, dtype=torch.float64)
            if kind == "orthogonal":
                gram += matrix.T @ matrix / draws
            squared.append((((x @ matrix.T) * (y @ matrix.T)).sum(1) - exact) ** 2)
        errors[kind] = torch.stack(squared).mean().item()
    assert (gram - torch.eye(d, dtype=torch.float64)).abs().max() < 0.25
    assert gram.diagonal().mean().item() == pytest.approx(1.0, abs=1e-12)  # trace is exact
    assert errors["orthogonal"] < 0.75 * errors["rademacher"]  # measured 0.53


def test_dtype_and_device():
    matrix = random_projection("d", (2, 3), dtype=torch.float64, device="cpu")
    assert matrix.dtype == torch.float64 and matrix.shape == (2, 3)


def test_seed_is_stable_sha256():
    assert seed_from_identifier("a") == seed_from_identifier("a")
    assert 0 <= seed_from_identifier("anything") < 2**63
    assert seed_from_identifier("a") != seed_from_identifier("b")


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        random_projection("x", (2, 2), kind="sparse")
    with pytest.raises(ValueError, match="shape must be"):
        random_projection("x", (0, 2))
    with pytest.raises(ValueError, match="shape must be"):
        random_projection("x", (2, 2, 2))
    with pytest.raises(ValueError, match=r"p <= d for orthogonal projections, got \(5, 3\)"):
        random_projection("x", (5, 3), kind="orthogonal")
