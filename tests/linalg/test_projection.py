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
        "print(random_projection('blocks.3.mlp/left', (4, 16), kind='normal').sum().item().hex())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    torch.manual_seed(7)  # the global RNG state must not matter
    here = random_projection("blocks.3.mlp/left", (4, 16), kind="normal").sum().item().hex()
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


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_johnson_lindenstrauss_norm_preservation(kind):
    vectors = torch.randn(200, 256, dtype=torch.float64)
    ratios = []
    for index in range(20):
        projection = random_projection(f"jl/{index}", (64, 256), kind=kind, dtype=torch.float64)
        ratios.append((vectors @ projection.T).norm(dim=1) ** 2 / vectors.norm(dim=1) ** 2)
    ratios = torch.stack(ratios)
    assert abs(ratios.mean().item() - 1.0) < 0.02  # unbiased
    assert ratios.std().item() < 0.3  # concentrated: ~ sqrt(2/p) = 0.18


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
