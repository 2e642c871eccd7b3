"""``torch.compile(optimizer.step)`` of every registered kronlab optimizer with
``on_nonfinite_grad="mask"``: a step that refreshes no preconditioner is one graph without a
break; a refresh step runs eagerly; across refresh periods the number of graphs stops growing;
the compiled trajectory, a masked non-finite step included, is the eager one.

Compiled with the ``"eager"`` backend: graph breaks and recompiles are decided by the tracing
(Dynamo); code generation on CPU would cost minutes in the test suite.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from kronlab.optim import KronOptimizer, create_optimizer

from .compile_checks import assert_one_graph, trajectory
from .state_checks import KRON_OPTIMIZERS

# Shampoo-family optimizers with a refresh before (root-inverse) or after (SOAP) the direction
REFRESHING = ["shampoo", "soap"]
FREQUENCY = 2  # refreshes at steps 1, 3, 5, …


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def wide_model() -> nn.Module:
    """A square layer of at least ``linalg.symmetric.SPLIT_MIN_SIZE``: its dense factors'
    products are computed in halves."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 260), nn.Tanh(), nn.Linear(260, 260), nn.Tanh(), nn.Linear(260, 3)
    )


def masked_optimizer(name: str, model: nn.Module, **group: object) -> torch.optim.Optimizer:
    """The registry's optimizer with the on-device non-finite check, frequent refreshes and
    the param-group settings ``group``."""
    optimizer = create_optimizer(name, model)
    optimizer.on_nonfinite_grad = "mask"
    for settings in optimizer.param_groups:
        if "precondition_frequency" in settings:
            settings["precondition_frequency"] = FREQUENCY
        settings.update(group)
    return optimizer


def backward(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """A forward and backward pass on batch ``step``, into the kept gradient tensors (a compiled
    step is reused only while they are the same objects). A regression loss on more examples
    than features: no factor is singular, so rounding differences are not amplified by ε."""
    generator = torch.Generator().manual_seed(step)
    inputs = torch.randn(16, 6, generator=generator)
    targets = torch.randn(16, 3, generator=generator)
    optimizer.zero_grad(set_to_none=False)
    nn.functional.mse_loss(model(inputs), targets).backward()


@pytest.mark.parametrize("build", [tiny_model, wide_model], ids=["tiny", "wide"])
@pytest.mark.parametrize("name", KRON_OPTIMIZERS)
def test_steady_state_step_is_one_graph(name: str, build: Callable[[], nn.Module]) -> None:
    model = build()
    optimizer = masked_optimizer(name, model)
    for step in range(3):  # state creation, the synchronously checked first step, refreshes
        backward(model, optimizer, step)
        optimizer.step()
    backward(model, optimizer, 3)  # step 4 refreshes nothing
    torch._dynamo.reset()
    assert_one_graph(optimizer.step)


def train(
    name: str, steps: int, non_finite_step: int, compiled: bool, graphs: list[int]
) -> tuple[nn.Module, KronOptimizer, list[list[torch.Tensor]]]:
    """``compile_checks.trajectory`` of the tiny model, a NaN in the first weight's gradient."""
    model = tiny_model()
    # ε well above float32 rounding of the factors' smallest eigenvalues, which (λ + ε)^{-1/4}
    # would amplify into differences between any two orders of the same float operations
    optimizer = masked_optimizer(name, model, eps=1e-5)

    def poison() -> None:
        next(model.parameters()).grad[0, 0] = float("nan")

    around = trajectory(
        model,
        optimizer,
        lambda index: backward(model, optimizer, index),
        poison,
        steps,
        non_finite_step,
        compiled,
        graphs,
    )
    return model, optimizer, around


@pytest.mark.parametrize("name", REFRESHING)
def test_compiled_steps_equal_eager_across_refreshes(name: str) -> None:
    torch._dynamo.reset()
    counters.clear()
    graphs: list[int] = []
    compiled, optimizer, (before, after) = train(name, 10, 6, True, graphs)
    # refresh steps 7 and 9 and the steps between them reuse the graphs compiled before
    assert graphs[6] == graphs[-1], graphs
    assert int(optimizer.masked_steps) == 1
    assert len(before) == len(after)
    for old, new in zip(before, after):
        assert torch.equal(old, new)
    eager, eager_optimizer, _ = train(name, 10, 6, False, [])
    assert int(eager_optimizer.masked_steps) == 1
    for compiled_param, eager_param in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(compiled_param, eager_param, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", KRON_OPTIMIZERS)
def test_traced_steps_rebind_no_attribute(name: str) -> None:
    """A compiled step drops attribute writes on an optimizer object (Dynamo carries out item
    writes into its dicts, not ``self.x = ...``): a step that is traced, i.e. one that
    refreshes nothing, must keep its Python values in containers, never rebind attributes."""
    model = tiny_model()
    optimizer = masked_optimizer(name, model)
    for step in range(3):
        backward(model, optimizer, step)
        optimizer.step()
    traced = 0
    for step in range(3, 3 + 2 * FREQUENCY):
        backward(model, optimizer, step)
        optimizer._counters["step"] += 1  # refresh_due asks about the step being taken
        due = optimizer.refresh_due()
        optimizer._counters["step"] -= 1
        before = {key: id(value) for key, value in vars(optimizer).items()}
        optimizer.step()
        if not due:
            traced += 1
            after = {key: id(value) for key, value in vars(optimizer).items()}
            assert after == before, sorted(k for k in after if after[k] != before.get(k))
    assert traced > 0
