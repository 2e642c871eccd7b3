"""A step whose preconditioner work is split over the ranks of a process group.

Each preconditioner bundle is owned by one rank (``kronlab.distributed.assign_work``). A rank
steps only the bundles it owns: its plan holds only those (``KronOptimizer.planned_bundles``),
and the gradients of the others are hidden from the update, so it creates no state for them
and does none of their work. The ranks then agree on the step's
outcome (one all-reduce: a non-finite gradient or value on any rank skips the step on all of
them, each rolling its own part back) and all-gather the owners' results (one all-gather per
dtype), after which every rank holds the same parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.distributed.tensor import DTensor

from kronlab.distributed import Assignment, DistributedConfig, WorkItem, assign_work
from kronlab.distributed.communication import (
    STEP_FAILED,
    STEP_NON_FINITE,
    STEP_OK,
    agree_on_outcome,
    all_gather_owned,
)
from kronlab.linalg.finite import all_finite

if TYPE_CHECKING:
    from kronlab.optim.base import KronOptimizer


class Sharding:
    """The assignment of an optimizer's bundles to the ranks of ``config.process_group``."""

    def __init__(self, config: DistributedConfig, items: list[WorkItem]) -> None:
        self.config = config
        self.rank, self.world_size = config.world()
        self.assignment: Assignment = assign_work(
            items,
            self.world_size,
            decomposition_weight=config.decomposition_weight,
            memory_weight=config.memory_weight,
        )

    def owns(self, bundle_index: int) -> bool:
        return self.assignment.owners[bundle_index] == self.rank


def check_shardable(optimizer: KronOptimizer) -> None:
    """Refuse parameters the sharded step cannot exchange: DTensors (FSDP2's ``fully_shard``),
    whose owner would need the whole tensor, not its shard."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if isinstance(param, DTensor):
                raise TypeError(
                    f"Invalid parameter {optimizer.parameter_name(param)}: a DTensor (allowed "
                    "with distributed=: plain tensors, e.g. under DistributedDataParallel; "
                    "FSDP2-sharded parameters are not supported by distributed= yet)"
                )


def sharded_step(optimizer: KronOptimizer, sharding: Sharding) -> None:
    """One step of ``optimizer`` with its bundles split as ``sharding`` says (after the
    closure). Every rank must call it, with or without gradients."""
    config = sharding.config
    bundles = optimizer.bundles
    owned = [p for index, b in enumerate(bundles) if sharding.owns(index) for p in b.params]
    owned_ids = {id(p) for p in owned}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    gradients = [p.grad for p in params if p.grad is not None]
    checked = optimizer.on_nonfinite_grad != "ignore"
    rounded = config.communication_dtype is not None
    before = [p.detach().clone() for p in owned] if rounded else []
    hidden = [(p, p.grad) for p in params if id(p) not in owned_ids and p.grad is not None]
    # a refused step draws no random numbers either (as in one process): the next step sees
    # the same stream
    generators = optimizer._generators.state_dict()
    outcome, error = STEP_OK, None
    try:
        for param, _ in hidden:
            param.grad = None
        outcome, error = _local_update(optimizer, owned, gradients, checked)
    finally:
        for param, gradient in hidden:
            param.grad = gradient
    device = params[0].device if params else torch.device("cpu")
    agreed = agree_on_outcome(outcome, device, config.process_group)
    if agreed != STEP_OK:
        optimizer._generators.load_state_dict(generators)
        if checked:
            optimizer._transaction.rollback(optimizer.state)
        if error is not None or agreed == STEP_FAILED or not checked:
            optimizer._count_step(-1)  # a counter, not state: the rollback does not restore it
            if error is not None:
                raise error
            raise RuntimeError("the optimizer step failed on another rank; step refused")
        optimizer._refuse_step("non-finite gradient or value on at least one rank")
        return
    if not rounded:
        all_gather_owned(
            [[p.detach() for p in b.params] for b in bundles],
            sharding.assignment.owners,
            sharding.rank,
            sharding.world_size,
            config.process_group,
        )
        return
    _exchange_rounded_changes(optimizer, sharding, owned, before)


def _local_update(
    optimizer: KronOptimizer,
    owned: list[torch.nn.Parameter],
    gradients: list[torch.Tensor],
    checked: bool,
) -> tuple[int, BaseException | None]:
    """Run the update of this rank's bundles as a transaction; its outcome and any error."""
    if checked:
        optimizer._transaction.begin(optimizer.state, owned)
    optimizer._count_step()
    try:
        optimizer.update()
    except Exception as exc:  # agreed on with the other ranks before it is raised
        if checked and not all_finite(gradients):
            return STEP_NON_FINITE, None  # the update choked on the non-finite gradient
        return STEP_FAILED, exc
    if not checked:
        return STEP_OK, None
    _, step_finite = optimizer._transaction.commit_if_finite(optimizer.state, owned, gradients)
    return (STEP_OK if step_finite else STEP_NON_FINITE), None


def _exchange_rounded_changes(
    optimizer: KronOptimizer,
    sharding: Sharding,
    owned: list[torch.nn.Parameter],
    before: list[torch.Tensor],
) -> None:
    """Send each owner's change ``p_new - p_old`` in the communication dtype; every rank (the
    owner too) sets ``p = p_old + rounded change``, so all ranks hold the same values."""
    old = {id(param): value for param, value in zip(owned, before)}
    changes = [
        [
            p.detach() - old[id(p)] if sharding.owns(index) else torch.zeros_like(p)
            for p in bundle.params
        ]
        for index, bundle in enumerate(optimizer.bundles)
    ]
    all_gather_owned(
        changes,
        sharding.assignment.owners,
        sharding.rank,
        sharding.world_size,
        sharding.config.process_group,
        sharding.config.communication_dtype,
    )
    for bundle, bundle_changes in zip(optimizer.bundles, changes):
        for param, change in zip(bundle.params, bundle_changes):
            if id(param) in old:
                param.detach().copy_(old[id(param)])
            param.detach().add_(change)


__all__ = ["Sharding", "sharded_step"]
