"""Newton–Schulz dtype choice: a fixed rule of shape and CPU features (bfloat16 for large
matrices on bf16 matrix units, else float32), bfloat16 on accelerators; a stack of one matrix
runs the 2-D path."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from kronlab.linalg import matmul_speed, newton_schulz
from kronlab.optim import Muon

# the module, not the function that kronlab.linalg re-exports under the same name
newton_schulz_module = importlib.import_module("kronlab.linalg.newton_schulz")


@pytest.mark.parametrize("units", [True, False])
def test_cpu_rule_picks_bfloat16_only_for_large_matrices_on_bf16_units(monkeypatch, units) -> None:
    monkeypatch.setattr(matmul_speed, "cpu_has_bf16_matrix_units", lambda: units)
    large = torch.bfloat16 if units else torch.float32
    assert matmul_speed.newton_schulz_dtype(512, 512, "cpu") == large
    assert matmul_speed.newton_schulz_dtype(512, 128, "cpu") == large  # 2**16 entries
    assert matmul_speed.newton_schulz_dtype(128, 128, "cpu") == torch.float32  # 2**14 entries
    assert matmul_speed.newton_schulz_dtype(64, 4096, "cpu") == torch.float32  # a small side


def test_accelerators_use_bfloat16() -> None:
    assert matmul_speed.newton_schulz_dtype(8, 8, "meta") == torch.bfloat16


def test_muon_auto_uses_the_chosen_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    import kronlab.optim.muon as muon_module

    monkeypatch.setattr(
        muon_module, "newton_schulz_dtype", lambda rows, columns, device: (
            torch.float32 if rows == 3 else torch.bfloat16
        )
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (6, 4)]
    weights = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [torch.randn(shape, generator=generator) for shape in shapes]
    runs = {}
    for ns_dtype in ("auto", torch.float32, torch.bfloat16):
        params = [nn.Parameter(w.clone()) for w in weights]
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        Muon(params, ns_dtype=ns_dtype).step()
        runs[ns_dtype] = params
    assert torch.equal(runs["auto"][0], runs[torch.float32][0])
    assert torch.equal(runs["auto"][1], runs[torch.bfloat16][1])
    assert not torch.equal(runs[torch.float32][1], runs[torch.bfloat16][1])


def test_a_stack_of_one_matrix_equals_the_single_matrix() -> None:
    matrix = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    single = newton_schulz(matrix)
    assert torch.equal(newton_schulz(matrix[None, None]), single[None, None])
    # the definition, in float64: X ← aX + (bA + cA²)X with A = XXᵀ, on the wide orientation
    x = matrix.T / (matrix.norm() + 1e-7)
    for _ in range(5):
        gram = x @ x.T
        x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
    torch.testing.assert_close(single, x.T, rtol=1e-10, atol=1e-7)
