"""``torch.compile(optimizer.step)`` of SIRFShampoo with ``on_nonfinite_grad="mask"`` on a model
whose stacks have different shapes: every step, the factor update's and the one between, is one
graph without a break; across ``T`` periods the number of graphs stops growing; the compiled
trajectory, a masked non-finite step included, is the eager one. Also when the forward pass is
not counted (batch size 1, warned once) and when the batch size changes from step to step.

Compiled with the ``"eager"`` backend: graph breaks and recompiles are decided by the tracing
(Dynamo); code generation on CPU would cost minutes in the test suite.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from kronlab.optim import SIRFShampoo, create_optimizer

from .compile_checks import assert_one_graph, trajectory

PERIOD = 2  # T: factor updates at steps 1, 3, 5, …
# "counted": a training-mode forward per step; "uncounted": in eval mode, so the hook counts no
# batch (batch size 1); "varying": the batch size changes between steps
FORWARDS = ["counted", "uncounted", "varying"]
pytestmark = pytest.mark.filterwarnings("ignore:SIRFShampoo saw no training-mode forward")


def mlp() -> nn.Module:
    """Grouped shapes (8, 7), (8, 9) twice and (3, 9): a stack of two and two of one, each of
    another shape."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
        nn.Linear(8, 3),
    )  # fmt: skip


def masked_optimizer(model: nn.Module) -> SIRFShampoo:
    """The registry's SIRFShampoo with the on-device non-finite check and ``T = PERIOD``."""
    optimizer = create_optimizer("sirfshampoo", model)
    assert isinstance(optimizer, SIRFShampoo)
    optimizer.on_nonfinite_grad = "mask"
    for group in optimizer.param_groups:
        group["T"] = PERIOD
    return optimizer


def backward(model: nn.Module, optimizer: SIRFShampoo, step: int, forward: str) -> None:
    """A forward and backward pass on batch ``step``, into the kept gradient tensors (a compiled
    step is reused only while they are the same objects). A regression loss on more examples
    than features: no factor is singular."""
    batch_size = 12 + 4 * (step % 3) if forward == "varying" else 16
    generator = torch.Generator().manual_seed(step)
    inputs = torch.randn(batch_size, 6, generator=generator)
    targets = torch.randn(batch_size, 3, generator=generator)
    model.train(forward != "uncounted")
    optimizer.zero_grad(set_to_none=False)
    nn.functional.mse_loss(model(inputs), targets).backward()


@pytest.mark.parametrize("forward", FORWARDS)
def test_every_step_is_one_graph(forward: str) -> None:
    model = mlp()
    optimizer = masked_optimizer(model)
    for step in range(3):  # state creation, the synchronously checked first step, an update
        backward(model, optimizer, step, forward)
        optimizer.step()
    torch._dynamo.reset()
    for step in (3, 4):  # step 4 updates no factor, step 5 does
        backward(model, optimizer, step, forward)
        assert_one_graph(optimizer.step)


def train(
    steps: int, non_finite_step: int, compiled: bool, forward: str, graphs: list[int]
) -> tuple[nn.Module, SIRFShampoo, list[list[torch.Tensor]]]:
    """``compile_checks.trajectory`` of the MLP, a NaN in a gradient of the stack of two."""
    model = mlp()
    optimizer = masked_optimizer(model)

    def poison() -> None:
        model[2].weight.grad[0, 0] = float("nan")

    around = trajectory(
        model,
        optimizer,
        lambda index: backward(model, optimizer, index, forward),
        poison,
        steps,
        non_finite_step,
        compiled,
        graphs,
    )
    return model, optimizer, around


@pytest.mark.parametrize("forward", FORWARDS)
def test_compiled_steps_equal_eager(forward: str) -> None:
    torch._dynamo.reset()
    counters.clear()
    graphs: list[int] = []
    compiled, optimizer, (before, after) = train(12, 6, True, forward, graphs)
    # steps 5 to 12, four periods, reuse the graphs compiled by then
    assert graphs[3] == graphs[-1], graphs
    assert int(optimizer.masked_steps) == 1
    assert len(before) == len(after)
    for old, new in zip(before, after):
        assert torch.equal(old, new)
    eager, eager_optimizer, _ = train(12, 6, False, forward, [])
    assert int(eager_optimizer.masked_steps) == 1
    for compiled_param, eager_param in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(compiled_param, eager_param, rtol=1e-5, atol=1e-6)


def test_missing_forward_warns_once() -> None:
    model = mlp()
    optimizer = masked_optimizer(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            backward(model, optimizer, step, "uncounted")
            optimizer.step()
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1 and "no training-mode forward" in messages[0], messages
    assert caught[0].filename == __file__  # reported at the caller of step


def test_compiled_model_counts_the_batch() -> None:
    """The forward pre-hook, traced into a compiled model's graph, still counts the batch."""
    model = mlp()
    optimizer = masked_optimizer(model)
    compiled = torch.compile(model, backend="eager")
    for step in range(3):
        compiled(torch.randn(5 + step, 6)).sum().backward()
        assert optimizer.pending_batch_size == 5 + step
        optimizer.step()
        assert optimizer.pending_batch_size == 0
