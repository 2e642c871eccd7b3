"""The stacking plan: every preconditioned block of every bundle, grouped into stacks.

Blocks of the same shape whose math hyperparameters agree share a stack ``(B, d_1, …, d_k)``, so
factor updates, decompositions and preconditioning run as one batched call per stack. Parameters
that get an elementwise treatment (vectors, scalars) are concatenated into one flat ``(1, N)``
stack. The plan is built at the first step from the bundles and their param groups, and
rebuilt when a param group is added later: the groups planned before keep their stacks (their
state already exists) and the new groups get stacks of their own, appended after them. Which
groups were planned together (``segments``) is saved with the state, so a checkpoint loads into
an optimizer constructed with all the groups at once.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from kronlab.groups.layout import BlockLayout, drop_unit_dims, plan_layout
from kronlab.optim.bundles import ParameterBundle

StackKind = Literal["kronecker", "diagonal", "grafting"]


@dataclass
class BlockStack:
    """Blocks ``members[i] = (bundle index, block index)`` processed together."""

    kind: StackKind
    block_shape: tuple[int, ...]
    group_index: int
    members: list[tuple[int, int]] = field(default_factory=list)
    flat_sizes: list[int] = field(default_factory=list)  # elementwise stacks only

    @property
    def num_factors(self) -> int:
        return len(self.block_shape) if self.kind == "kronecker" else 0


@dataclass
class StackingPlan:
    """``layouts[b]``: bundle b's block layout (``None`` for elementwise bundles);
    ``slots[b]``: ``(stack index, position)`` of each of its blocks; ``segments``: cumulative
    param-group counts of the groups planned together (blocks of two segments never share a
    stack)."""

    stacks: list[BlockStack]
    layouts: list[BlockLayout | None]
    slots: list[list[tuple[int, int]]]
    segments: list[int] = field(default_factory=list)

    def gather(self, index: int, bundle_tensors: list[torch.Tensor | None]) -> torch.Tensor:
        """Stack ``index``'s blocks taken from per-bundle grouped tensors."""
        stack = self.stacks[index]
        # A stack of one member is a view of it: ``cat``/``stack`` of one tensor would copy it
        # every step. Safe because the step only reads its gradient stacks.
        if stack.kind != "kronecker":
            flat = [bundle_tensors[b].reshape(-1) for b, _ in stack.members]
            return (flat[0] if len(flat) == 1 else torch.cat(flat)).unsqueeze(0)
        if len(stack.members) == 1:
            ((bundle_index, block_index),) = stack.members
            layout = self.layouts[bundle_index]
            block = layout.split(bundle_tensors[bundle_index])[block_index]
            return block.reshape(stack.block_shape).unsqueeze(0)
        blocks = {}
        for bundle_index, _ in stack.members:
            if bundle_index not in blocks:
                layout = self.layouts[bundle_index]
                blocks[bundle_index] = layout.split(bundle_tensors[bundle_index])
        return torch.stack([blocks[b][j].reshape(stack.block_shape) for b, j in stack.members])

    def scatter(
        self,
        stack_directions: list[tuple[torch.Tensor, float | torch.Tensor]],
        shapes: list[torch.Size],
    ) -> list[tuple[torch.Tensor, float | torch.Tensor]]:
        """Per-bundle grouped tensors reassembled from per-stack results.

        A stack's result is ``(D, s)``, meaning ``s · D`` with ``s`` a float or per-block
        factors ``(B, 1, …)``; so is each bundle's: a bundle of one block keeps its block's
        factor (as a 0-d tensor), the blocks of a larger bundle are scaled before they are
        merged (the merge copies them anyway).
        """
        pieces: list[list[tuple[torch.Tensor, Any] | None]] = [[None] * len(s) for s in self.slots]
        for stack, (result, scale) in zip(self.stacks, stack_directions):
            if stack.kind != "kronecker":
                for (b, _), part in zip(stack.members, result[0].split(stack.flat_sizes)):
                    pieces[b][0] = (part, scale)
                continue
            scales = scale.reshape(-1).unbind(0) if isinstance(scale, torch.Tensor) else None
            for position, ((b, j), block) in enumerate(zip(stack.members, result.unbind(0))):
                pieces[b][j] = (block, scale if scales is None else scales[position])
        grouped: list[tuple[torch.Tensor, float | torch.Tensor]] = []
        for b, parts in enumerate(pieces):
            layout = self.layouts[b]
            if len(parts) == 1:
                ((part, scale),) = parts  # type: ignore[misc]
                grouped.append((part.reshape(shapes[b]), scale))
                continue
            blocks = [
                (part if isinstance(scale, float) and scale == 1.0 else part * scale).reshape(shape)
                for (part, scale), shape in zip(parts, layout.block_shapes)  # type: ignore[union-attr,misc]
            ]
            grouped.append((layout.merge(blocks), 1.0))  # type: ignore[union-attr]
        return grouped


def build_plan(
    bundles: list[ParameterBundle],
    groups: list[dict[str, Any]],
    stack_key: Callable[[dict[str, Any], torch.Tensor], tuple],
    segments: Sequence[int] = (),
) -> StackingPlan:
    """Assign every block of every bundle to a stack.

    A bundle whose grouped tensor has at most one dim larger than 1 gets its group's
    ``vector_preconditioner`` (``"dense"`` makes it a one-factor Kronecker block). Otherwise the
    layout comes from ``plan_layout`` (size-1 dims dropped, small dims merged, large dims
    blocked). ``stack_key(group, param)`` names the hyperparameters blocks must share.
    ``segments`` (cumulative group counts, default: all groups at once) keeps groups added after
    the first step out of the stacks planned before them; stacks come in segment order.
    """
    segments = list(segments)
    if not segments or segments[-1] < len(groups):
        segments.append(len(groups))
    stacks: list[BlockStack] = []
    index_of: dict[tuple, int] = {}
    layouts: list[BlockLayout | None] = []
    slots: list[list[tuple[int, int]]] = []
    for bundle_index, bundle in enumerate(bundles):
        group = groups[bundle.group_index]
        shape = tuple(bundle.grouped_shape)
        is_vector = len(drop_unit_dims(shape)) <= 1
        kind: StackKind = "kronecker"
        if is_vector and group["vector_preconditioner"] != "dense":
            kind = group["vector_preconditioner"]
        segment = bisect_right(segments, bundle.group_index)
        base_key = (segment, kind, stack_key(group, bundle.key))
        if kind != "kronecker" or not drop_unit_dims(shape):
            if kind == "kronecker":  # a scalar has no factor: it gets the diagonal treatment
                kind = "diagonal"
                base_key = (segment, kind, stack_key(group, bundle.key))
            layouts.append(None)
            key = base_key
            if key not in index_of:
                index_of[key] = len(stacks)
                stacks.append(BlockStack(kind, (), bundle.group_index))
            stack = stacks[index_of[key]]
            slots.append([(index_of[key], len(stack.members))])
            stack.members.append((bundle_index, 0))
            stack.flat_sizes.append(math.prod(shape))
            continue
        layout = plan_layout(shape, group["max_preconditioner_dim"], merge_dims=group["merge_dims"])
        layouts.append(layout)
        bundle_slots = []
        for block_index, block_shape in enumerate(layout.block_shapes):
            key = (*base_key, block_shape)
            if key not in index_of:
                index_of[key] = len(stacks)
                stacks.append(BlockStack("kronecker", block_shape, bundle.group_index))
            stack = stacks[index_of[key]]
            bundle_slots.append((index_of[key], len(stack.members)))
            stack.members.append((bundle_index, block_index))
        slots.append(bundle_slots)
    for stack in stacks:
        if stack.kind != "kronecker":
            stack.block_shape = (sum(stack.flat_sizes),)
    return StackingPlan(stacks, layouts, slots, segments)
