"""A step whose preconditioner work is split over the ranks of a process group.

Each preconditioner bundle is owned by one rank (``kronlab.distributed.assign_work``). A rank
steps only the bundles it owns: its plan holds only those (``KronOptimizer.planned_bundles``),
and the gradients of the others are hidden from the update, so it creates no state for them
and does none of their work. The ranks then agree on the step's
outcome (one all-reduce: a non-finite gradient or value on any rank skips the step on all of
them, each rolling its own part back) and all-gather the owners' results (one all-gather per
dtype), after which every rank holds the same parameters.

FSDP2-sharded (DTensor) parameters take the same step on full tensors: the owner gathers their
shards first and sends every rank its shards of the result afterwards
(``kronlab.optim.full_views``), so the step is the one of a single process on the global batch.
"""

from __future__ import annotations

from contextlib import nullcontext
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
from kronlab.distributed.fsdp import local_shard
from kronlab.linalg.finite import all_finite
from kronlab.optim.full_views import FullViews, check_layouts, sharded_parameters

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

        self.full_views: FullViews | None = None  # built at the first step (FSDP2 only)
        self.views_built = False  # whether the first step looked for DTensor parameters

    def owns(self, bundle_index: int) -> bool:
        return self.assignment.owners[bundle_index] == self.rank


def implied_config(optimizer: KronOptimizer) -> DistributedConfig | None:
    """``distributed=`` as FSDP2-sharded parameters imply it: their owners need the whole
    tensors, so the bundles are split over the ranks of their mesh (``None`` without DTensor
    parameters)."""
    sharded = sharded_parameters(optimizer)
    if not sharded:
        return None
    if optimizer.on_nonfinite_grad == "mask":
        raise ValueError(
            "Invalid on_nonfinite_grad: 'mask' with DTensor (FSDP2) parameters (allowed: "
            "'skip', 'raise' or 'ignore'; the ranks agree on a skipped step with one all-reduce)"
        )
    mesh = sharded[0].device_mesh
    return DistributedConfig(process_group=mesh.get_group() if mesh.ndim == 1 else None)


def check_shardable(optimizer: KronOptimizer) -> None:
    """Refuse parameters the sharded step cannot exchange: DTensors not sharded along one
    dimension over a 1-D mesh of the process group's ranks (``TypeError`` naming the first)."""
    assert optimizer.distributed is not None
    check_layouts(optimizer, optimizer.distributed.process_group)


def sharded_step(optimizer: KronOptimizer, sharding: Sharding) -> None:
    """One step of ``optimizer`` with its bundles split as ``sharding`` says (after the
    closure). Every rank must call it, with or without gradients."""
    config = sharding.config
    bundles = optimizer.bundles
    views = full_views(optimizer, sharding)
    if views is not None:
        views.gather()
    owned_params = [p for index, b in enumerate(bundles) if sharding.owns(index) for p in b.params]
    owned_ids = {id(p) for p in owned_params}
    # what this rank steps: the full-shape stand-ins of DTensor parameters, else the parameters
    owned = [views.stand_in(p) for p in owned_params] if views is not None else owned_params
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # every rank tests its own shards; the all-reduce below combines the verdicts
    gradients = [local_shard(p.grad) for p in params if p.grad is not None]
    checked = optimizer.on_nonfinite_grad != "ignore"
    rounded = config.communication_dtype is not None
    before = {id(p): p.detach().clone() for p in owned} if rounded else {}
    hidden = [(p, p.grad) for p in params if id(p) not in owned_ids and p.grad is not None]
    # a refused step draws no random numbers either (as in one process): the next step sees
    # the same stream
    generators = optimizer._generators.state_dict()
    outcome, error = STEP_OK, None
    device = local_shard(params[0]).device if params else torch.device("cpu")
    try:
        with views.swapped(optimizer.state) if views is not None else nullcontext():
            try:
                for param, _ in hidden:
                    param.grad = None
                outcome, error = _local_update(optimizer, owned, gradients, checked)
            finally:
                for param, gradient in hidden:
                    param.grad = gradient
            agreed = agree_on_outcome(outcome, device, config.process_group)
            if agreed != STEP_OK and checked:
                optimizer._transaction.rollback(optimizer.state)
    finally:
        if views is not None:
            views.release()
    if agreed != STEP_OK:
        optimizer._generators.load_state_dict(generators)
        if error is not None or agreed == STEP_FAILED or not checked:
            optimizer._count_step(-1)  # a counter, not state: the rollback does not restore it
            if error is not None:
                raise error
            raise RuntimeError("the optimizer step failed on another rank; step refused")
        optimizer._refuse_step("non-finite gradient or value on at least one rank")
        return
    _exchange(optimizer, sharding, before)
    if views is not None:
        views.scatter(config.communication_dtype, before if rounded else None)


def full_views(optimizer: KronOptimizer, sharding: Sharding) -> FullViews | None:
    """The stand-ins of this rank's DTensor parameters (``None`` without any), built once:
    the first step of a sharding looks for them, later steps reuse the answer."""
    if not sharding.views_built:
        sharding.views_built = True
        if sharded_parameters(optimizer):
            sharding.full_views = FullViews(
                optimizer,
                sharding.assignment.owners,
                sharding.rank,
                sharding.world_size,
                sharding.config.process_group,
            )
    return sharding.full_views


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


def _exchange(
    optimizer: KronOptimizer, sharding: Sharding, before: dict[int, torch.Tensor]
) -> None:
    """Give every rank the owners' new values of the plain (not DTensor) parameters: the
    values themselves, or, in a narrower communication dtype (``before`` holds the owned
    values before the step), each owner's change ``p_new - p_old``, which every rank (the owner
    too) adds to ``p_old``, so that all ranks hold the same values."""
    config = sharding.config
    plain = [[p for p in b.params if not isinstance(p, DTensor)] for b in optimizer.bundles]
    if not before:
        all_gather_owned(
            [[p.detach() for p in params] for params in plain],
            sharding.assignment.owners,
            sharding.rank,
            sharding.world_size,
            config.process_group,
        )
        return
    changes = [
        [
            p.detach() - before[id(p)] if sharding.owns(index) else torch.zeros_like(p)
            for p in params
        ]
        for index, params in enumerate(plain)
    ]
    all_gather_owned(
        changes,
        sharding.assignment.owners,
        sharding.rank,
        sharding.world_size,
        config.process_group,
        config.communication_dtype,
    )
    for params, bundle_changes in zip(plain, changes):
        for param, change in zip(params, bundle_changes):
            if id(param) in before:
                param.detach().copy_(before[id(param)])
            param.detach().add_(change)


__all__ = ["Sharding", "check_shardable", "full_views", "implied_config", "sharded_step"]
