"""The cost model and the assignment of work to ranks, checked without processes."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from kronlab.distributed import (
    DistributedConfig,
    OrthogonalizationItem,
    WorkItem,
    assign_work,
    kronecker_item,
)
from kronlab.optim import Muon


def test_cost_model_follows_its_definition() -> None:
    item = kronecker_item("w", (6, 4), refresh_interval=2)
    assert item.factor_dims == (6, 4)
    assert item.step_cost() == 2 * 24 * (6 + 4)
    assert item.decomposition_cost() == (6**3 + 4**3) / 2
    assert item.state_elements() == 2 * (36 + 16) + 3 * 24
    assert item.cost(decomposition_weight=0.0) == item.step_cost()
    assert item.cost(memory_weight=1.0) == (
        item.step_cost() + item.decomposition_cost() + item.state_elements()
    )
    # dimensions above the limit (or of size 1) get no factor; vectors are elementwise
    assert kronecker_item("w", (6, 1, 40), max_factor_dim=32).factor_dims == (6,)
    vector = kronecker_item("b", (7,))
    assert vector.factor_dims == () and vector.step_cost() == 70 and vector.state_elements() == 14


def test_muon_costs_its_newton_schulz_steps() -> None:
    """Muon's matrices cost ``ns_steps · (2 · m · n · min(m, n) + min(m, n)³)``: a tall and
    a wide matrix of the same size cost the same, and no decomposition is counted."""
    model = nn.Sequential(nn.Linear(64, 4), nn.Linear(4, 64), nn.Linear(64, 2))  # head: AdamW
    optimizer = Muon(model=model, lr=0.02, ns_steps=3)
    items = {item.block_shape: item for item in optimizer.distributed_work_items()}
    for shape in ((4, 64), (64, 4)):
        item = items[shape]
        assert isinstance(item, OrthogonalizationItem)
        assert item.cost(decomposition_weight=1.0) == 3 * (2 * 64 * 4 * 4 + 4**3)
        assert item.state_elements() == 64 * 4
    assert items[(64,)].step_cost() == 10 * 64  # the AdamW bias: elementwise


def _optimal_makespan(costs: list[float], world_size: int) -> float:
    best = float("inf")
    for owners in itertools.product(range(world_size), repeat=len(costs)):
        loads = [0.0] * world_size
        for cost, owner in zip(costs, owners):
            loads[owner] += cost
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_assignment_is_within_four_thirds_of_the_best_and_deterministic(world_size: int) -> None:
    generator = torch.Generator().manual_seed(world_size)
    sizes = torch.randint(2, 40, (8, 2), generator=generator).tolist()
    items = [kronecker_item(index, tuple(size)) for index, size in enumerate(sizes)]
    assignment = assign_work(items, world_size)
    again = assign_work(list(items), world_size)
    assert assignment.owners == again.owners
    costs = [item.cost() for item in items]
    for rank in range(world_size):
        owned = [c for c, owner in zip(costs, assignment.owners) if owner == rank]
        assert assignment.loads[rank] == pytest.approx(sum(owned))
    assert max(assignment.loads) <= 4 / 3 * _optimal_makespan(costs, world_size) + 1e-9
    assert sum(assignment.state_elements) == sum(item.state_elements() for item in items)


def test_equal_items_spread_evenly_and_ties_go_to_the_lower_rank() -> None:
    items = [WorkItem(index, (4, 4), (4, 4)) for index in range(7)]
    assignment = assign_work(items, 3)
    assert assignment.owners == (0, 1, 2, 0, 1, 2, 0)
    assert assignment.imbalance == pytest.approx(3 / (7 / 3))
    assert [item.key for item in assignment.owned_by(1)] == [1, 4]
    assert assignment.owner(5) == 2


def test_report_gives_each_ranks_share() -> None:
    items = [kronecker_item("a", (8, 8)), kronecker_item("b", (8, 8)), kronecker_item("c", (3,))]
    report = assign_work(items, 2).report()
    assert report.splitlines()[0].startswith("Distributed over 2 ranks: 3 work items")
    assert "- rank 0: 2 items" in report and "- rank 1: 1 items" in report
    assert "% of the compute" in report and "% of the state" in report


def test_more_ranks_than_items_leaves_ranks_idle() -> None:
    assignment = assign_work([kronecker_item("a", (4, 4))], 3)
    assert assignment.owners == (0,) and assignment.loads[1:] == (0.0, 0.0)
    assert assign_work([], 2).imbalance == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(process_group="world"), "process_group: 'world'"),
        (dict(communication_dtype=torch.int8), "communication_dtype: torch.int8"),
        (dict(decomposition_weight=-1.0), r"decomposition_weight: -1.0 \(allowed"),
        (dict(memory_weight=float("nan")), "memory_weight: nan"),
        (dict(memory_weight=True), "memory_weight: True"),
    ],
)
def test_bad_config_is_refused_naming_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistributedConfig(**kwargs)


def test_bad_world_size_is_refused() -> None:
    with pytest.raises(ValueError, match="world_size: 0"):
        assign_work([], 0)


def test_config_without_a_process_group_is_one_rank() -> None:
    assert DistributedConfig().world() == (0, 1)
