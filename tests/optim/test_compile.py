"""``torch.compile(optimizer.step)`` with ``on_nonfinite_grad="mask"``: no graph break
(``fullgraph=True``; PSGD's fit noise is drawn inside the graph by a custom operator), no
recompiles after warm-up, the eager step's results, and a non-finite step undone on the device.

The compiled steps use the ``"eager"`` backend: graph breaks and recompiles are decided by the
tracing (Dynamo), and code generation on CPU would cost minutes in the test suite.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from kronlab.optim import PSGD, Muon

OPTIMIZERS = {
    "muon": lambda model: Muon(None, model=model, on_nonfinite_grad="mask"),
    "psgd": lambda model: PSGD(model.parameters(), on_nonfinite_grad="mask"),
    # float32 factors and a fit noise large enough to move the trajectory: the compiled step
    # must draw, in the graph, the numbers the eager step draws
    "psgd_noisy": lambda model: PSGD(
        model.parameters(), on_nonfinite_grad="mask", dtype=torch.float32, noise_scale=0.5
    ),
}
# PSGD's preconditioner is bfloat16 (its default dtype); traced, its products round differently
TOLERANCES = {
    "muon": {"rtol": 1e-6, "atol": 1e-7},
    "psgd": {"rtol": 2e-3, "atol": 2e-5},
    "psgd_noisy": {"rtol": 1e-6, "atol": 1e-7},
}
WARM_UP = 2  # eager steps: state creation and the first, synchronously checked, step


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def set_gradients(model: nn.Module, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    for param in model.parameters():
        # in place: compiled steps see the same gradient tensors (zero_grad(set_to_none=False))
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        param.grad.copy_(torch.randn(param.shape, generator=generator))


def train(
    name: str, steps: int, compiled: bool, graphs: list[int] | None = None
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``steps`` steps (eager warm-up, then compiled if asked); ``graphs`` collects the number
    of graphs compiled so far after each step."""
    model = tiny_model()
    optimizer = OPTIMIZERS[name](model)
    step = torch.compile(optimizer.step, backend="eager", fullgraph=True)
    for index in range(steps):
        set_gradients(model, index)
        (step if compiled and index >= WARM_UP else optimizer.step)()
        if graphs is not None:
            graphs.append(counters["stats"]["unique_graphs"])
    return model, optimizer


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compiled_step_has_one_graph_and_equals_eager(name: str) -> None:
    torch._dynamo.reset()
    counters.clear()
    graphs: list[int] = []
    compiled_model, _ = train(name, WARM_UP + 5, compiled=True, graphs=graphs)
    # Python step counters become dynamic after one recompile; then every step reuses the graphs
    assert graphs[-1] == graphs[-3], graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
    eager_model, _ = train(name, WARM_UP + 5, compiled=False)
    for compiled_param, eager_param in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(compiled_param, eager_param, **TOLERANCES[name])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_masked_non_finite_step_leaves_parameters_and_state_untouched(name: str) -> None:
    torch._dynamo.reset()
    model, optimizer = train(name, WARM_UP + 2, compiled=True)
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {
        (index, key): value.clone()
        for index, p in enumerate(model.parameters())
        for key, value in optimizer.state.get(p, {}).items()
        if isinstance(value, torch.Tensor)
    }
    set_gradients(model, 99)
    next(model.parameters()).grad[0, 0] = float("nan")
    torch.compile(optimizer.step, backend="eager", fullgraph=True)()
    for param, old in zip(model.parameters(), before):
        assert torch.equal(param, old)
    for (index, key), old in state_before.items():
        assert torch.equal(optimizer.state[list(model.parameters())[index]][key], old), key
    assert int(optimizer.masked_steps) == 1


def test_psgd_bundle_waiting_for_its_first_gradient_is_initialised_by_an_eager_step() -> None:
    """A bundle whose gradients are all zero waits (its initial scale needs a non-zero mean
    square, read on the host); the compiled step that initialises it runs eagerly
    (``PSGD.refresh_due``), and the trajectory is the eager one."""

    def run(compiled: bool, graphs: list[int], due: list[bool]) -> nn.Module:
        model = tiny_model()
        optimizer = OPTIMIZERS["psgd_noisy"](model)
        step = torch.compile(optimizer.step, backend="eager")
        for index in range(10):
            set_gradients(model, index)
            if index < 4:  # the first layer's gradients are zero for four steps
                model[0].weight.grad.zero_()
                model[0].bias.grad.zero_()
            due.append(optimizer.refresh_due())
            (step if compiled and index >= 1 else optimizer.step)()
            graphs.append(counters["stats"]["unique_graphs"])
        return model

    torch._dynamo.reset()
    counters.clear()
    graphs: list[int] = []
    due: list[bool] = []
    compiled = run(True, graphs, due)
    # eager: the first step, the three steps the first layer waits, the step that initialises it
    assert due == [True] * 5 + [False] * 5, due
    assert graphs[-1] == graphs[-3], graphs
    eager = run(False, [], [])
    for compiled_param, eager_param in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(compiled_param, eager_param, **TOLERANCES["psgd_noisy"])
