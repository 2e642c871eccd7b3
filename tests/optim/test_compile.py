"""``torch.compile(optimizer.step)`` with ``on_nonfinite_grad="mask"``: no graph break but the
expected ones (Muon: none, ``fullgraph=True``; PSGD: its fit noise, drawn eagerly from the
optimizer's own generator), no recompiles after warm-up, the eager step's results, and a
non-finite step undone on the device.

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
}
# PSGD's preconditioner is bfloat16 (its default dtype); traced, its products round differently
FULLGRAPH = {"muon": True, "psgd": False}
GRAPH_BREAKS = {"muon": 0, "psgd": 1}  # PSGD: the fit noise's draw (psgd._standard_normal)
TOLERANCES = {"muon": {"rtol": 1e-6, "atol": 1e-7}, "psgd": {"rtol": 2e-3, "atol": 2e-5}}
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
    step = torch.compile(optimizer.step, backend="eager", fullgraph=FULLGRAPH[name])
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
    assert len(counters["graph_break"]) == GRAPH_BREAKS[name], dict(counters["graph_break"])
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
    torch.compile(optimizer.step, backend="eager", fullgraph=FULLGRAPH[name])()
    for param, old in zip(model.parameters(), before):
        assert torch.equal(param, old)
    for (index, key), old in state_before.items():
        assert torch.equal(optimizer.state[list(model.parameters())[index]][key], old), key
    assert int(optimizer.masked_steps) == 1
