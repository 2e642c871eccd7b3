"""Newton–Schulz dtype choice: the faster of bfloat16 and float32 per shape on CPU (measured
once), bfloat16 on accelerators; a stack of one matrix runs the 2-D path."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from kronlab.linalg import matmul_speed, newton_schulz
from kronlab.optim import Muon

# the module, not the function that kronlab.linalg re-exports under the same name
newton_schulz_module = importlib.import_module("kronlab.linalg.newton_schulz")


class CostClock:
    """A fake clock that a fake Newton–Schulz advances by a cost per dtype."""

    def __init__(self, costs: dict[torch.dtype, float]) -> None:
        self.now, self.costs, self.calls = 0.0, costs, 0

    def perf_counter(self) -> float:
        return self.now

    def newton_schulz(self, matrix: torch.Tensor, steps: int) -> torch.Tensor:
        self.calls += 1
        self.now += self.costs[matrix.dtype]
        return matrix


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch):
    def install(costs: dict[torch.dtype, float]) -> CostClock:
        fake = CostClock(costs)
        monkeypatch.setattr(matmul_speed.time, "perf_counter", fake.perf_counter)
        monkeypatch.setattr(newton_schulz_module, "newton_schulz", fake.newton_schulz)
        matmul_speed._measure_on_cpu.cache_clear()
        return fake

    yield install
    matmul_speed._measure_on_cpu.cache_clear()


def test_cpu_choice_is_the_measured_faster_dtype_and_is_cached(clock) -> None:
    fake = clock({torch.bfloat16: 3.0, torch.float32: 1.0})
    assert matmul_speed.fastest_newton_schulz_dtype(10, 512, 1, "cpu") == torch.float32
    calls = fake.calls
    # the same shape (either orientation) is not measured again
    assert matmul_speed.fastest_newton_schulz_dtype(512, 10, 1, "cpu") == torch.float32
    assert fake.calls == calls
    fake.costs = {torch.bfloat16: 1.0, torch.float32: 4.0}
    assert matmul_speed.fastest_newton_schulz_dtype(256, 512, 2, "cpu") == torch.bfloat16


def test_ties_go_to_bfloat16_and_accelerators_need_no_measurement(clock) -> None:
    fake = clock({torch.bfloat16: 1.0, torch.float32: 1.0})
    assert matmul_speed.fastest_newton_schulz_dtype(8, 8, 1, "cpu") == torch.bfloat16
    calls = fake.calls
    assert matmul_speed.fastest_newton_schulz_dtype(8, 8, 1, "meta") == torch.bfloat16
    assert fake.calls == calls


def test_muon_auto_uses_the_chosen_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    import kronlab.optim.muon as muon_module

    monkeypatch.setattr(
        muon_module, "fastest_newton_schulz_dtype", lambda rows, columns, batch, device: (
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
