"""Which rank owns which work item: longest-processing-time-first, the same on every rank.

Items are taken in decreasing cost and each goes to the rank with the least cost so far
(Graham, 1969: the largest load is within 4/3 of the optimum). Ties are broken by the item's
position and the rank number only, so every rank computes the same assignment from the same
items without communicating.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from kronlab.distributed.cost import WorkItem


@dataclass(frozen=True)
class Assignment:
    """``owners[i]``: the rank owning ``items[i]``; per-rank cost and state elements."""

    items: tuple[WorkItem, ...]
    owners: tuple[int, ...]
    world_size: int
    loads: tuple[float, ...]
    state_elements: tuple[int, ...]

    def owner(self, key: Hashable) -> int:
        for item, owner in zip(self.items, self.owners):
            if item.key == key:
                return owner
        raise KeyError(key)

    def owned_by(self, rank: int) -> list[WorkItem]:
        return [item for item, owner in zip(self.items, self.owners) if owner == rank]

    @property
    def imbalance(self) -> float:
        """Largest rank load over the mean load (1.0 is a perfect balance)."""
        total = sum(self.loads)
        if total == 0:
            return 1.0
        return max(self.loads) / (total / self.world_size)

    def report(self) -> str:
        """The load-balance report printed by ``verbose_init``."""
        total_load = sum(self.loads) or 1.0
        total_state = sum(self.state_elements) or 1
        lines = [
            f"Distributed over {self.world_size} ranks: {len(self.items)} work items, "
            f"largest load {self.imbalance:.2f}x the mean"
        ]
        for rank in range(self.world_size):
            count = sum(1 for owner in self.owners if owner == rank)
            lines.append(
                f"- rank {rank}: {count} items, {100 * self.loads[rank] / total_load:.1f}% of "
                f"the compute, {100 * self.state_elements[rank] / total_state:.1f}% of the "
                f"state ({self.state_elements[rank]} elements)"
            )
        return "\n".join(lines)


def assign_work(
    items: Sequence[WorkItem],
    world_size: int,
    *,
    decomposition_weight: float = 1.0,
    memory_weight: float = 0.0,
) -> Assignment:
    """Assign ``items`` to ``world_size`` ranks, balancing ``WorkItem.cost``."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size!r} (allowed: an integer >= 1)")
    costs = [item.cost(decomposition_weight, memory_weight) for item in items]
    loads = [0.0] * world_size
    owners = [0] * len(items)
    # decreasing cost, then item position: deterministic whatever the float ties
    for index in sorted(range(len(items)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    state = [0] * world_size
    for item, owner in zip(items, owners):
        state[owner] += item.state_elements()
    return Assignment(tuple(items), tuple(owners), world_size, tuple(loads), tuple(state))
