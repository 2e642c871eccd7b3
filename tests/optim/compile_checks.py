"""Shared checks of ``torch.compile(optimizer.step)``: one graph without a break, and a
trajectory (compiled or eager) with a non-finite step whose parameters and state are kept."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch._dynamo.utils import counters


def assert_one_graph(step: Callable[[], object]) -> None:
    """``step()`` traced by Dynamo is one graph without a break."""
    explained = torch._dynamo.explain(step)()
    reasons = [reason.reason.splitlines()[0] for reason in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


def state_tensors(value: object) -> list[torch.Tensor]:
    """Every tensor of a nested state, in order (clones): a masked step restores the tensors;
    the Python step counters advance either way."""
    if isinstance(value, torch.Tensor):
        return [value.clone()]
    if isinstance(value, dict):
        return [t for item in value.values() for t in state_tensors(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in state_tensors(item)]
    return []


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    parameters = [p.detach().clone() for p in model.parameters()]
    # only the existing entries: reading a missing one would add it (a defaultdict) and make
    # the compiled step recompile for the new number of entries
    states = [optimizer.state[p] for p in model.parameters() if p in optimizer.state]
    return parameters + state_tensors(states)


def trajectory(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    backward: Callable[[int], None],
    poison: Callable[[], None],
    steps: int,
    non_finite_step: int,
    compiled: bool,
    graphs: list[int],
) -> list[list[torch.Tensor]]:
    """``steps`` steps after ``backward(index)`` (the first eager, the rest compiled if asked);
    ``poison()`` makes a gradient entry non-finite at ``non_finite_step``; ``graphs`` collects
    the number of graphs compiled after each step. Returns the parameters and state before and
    after the non-finite step."""
    step = torch.compile(optimizer.step, backend="eager")
    around: list[list[torch.Tensor]] = []
    for index in range(1, steps + 1):
        backward(index)
        if index == non_finite_step:
            poison()
            around.append(snapshot(model, optimizer))
        (step if compiled and index > 1 else optimizer.step)()
        if index == non_finite_step:
            around.append(snapshot(model, optimizer))
        graphs.append(counters["stats"]["unique_graphs"])
    return around
