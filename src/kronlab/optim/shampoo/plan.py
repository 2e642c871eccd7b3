"""Shampoo's blocks on the step template's plan (``kronlab.optim.step_template``).

Each bundle says what work its blocks need (``bundle_work``): a Kronecker block per piece of its
layout (size-1 dims dropped, small dims merged, large dims blocked), or one elementwise block
for vectors and scalars (the group's ``vector_preconditioner``: ``"diagonal"``, ``"grafting"``;
``"dense"`` makes a vector a one-factor Kronecker block). The template gathers same-work blocks
of one param group into a stack, so factor updates, decompositions and preconditioning run as
one batched call per stack; a param group added later gets stacks of its own.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from kronlab.groups.layout import BlockLayout, drop_unit_dims, plan_layout
from kronlab.linalg._dtypes import working_dtype
from kronlab.optim.bundles import ParameterBundle
from kronlab.optim.step_template import Stack, Work

StackKind = Literal["kronecker", "diagonal", "grafting"]

# A stack's result: ``(D, s)``, the direction ``s · D`` with ``s`` a float or per-block factors
# ``(B, 1, …)``; a bundle's likewise (``s`` a float or a 0-d tensor).
Scaled = tuple[torch.Tensor, float | torch.Tensor]


def bundle_layout(bundle: ParameterBundle, group: dict[str, Any]) -> BlockLayout | None:
    """How a bundle's grouped tensor is cut into Kronecker blocks (``None``: elementwise)."""
    shape = tuple(bundle.grouped_shape)
    kept = drop_unit_dims(shape)
    if not kept or (len(kept) == 1 and group["vector_preconditioner"] != "dense"):
        return None  # a scalar has no factor: it gets the diagonal treatment
    return plan_layout(shape, group["max_preconditioner_dim"], merge_dims=group["merge_dims"])


def bundle_work(
    bundle: ParameterBundle, group: dict[str, Any], layout: BlockLayout | None
) -> list[Work]:
    """One ``Work`` per block; its key is the stack kind."""
    dtype = working_dtype(bundle.key.dtype)
    if layout is not None:
        return [Work(shape, dtype, "kronecker") for shape in layout.block_shapes]
    shape = tuple(bundle.grouped_shape)
    kind = group["vector_preconditioner"] if drop_unit_dims(shape) else "diagonal"
    return [Work((math.prod(shape),), dtype, kind)]


def gather(
    stack: Stack, layouts: dict[int, BlockLayout | None], gradients: dict[int, torch.Tensor]
) -> torch.Tensor:
    """The stack's blocks ``(B, *shape)`` from per-bundle grouped tensors (keyed by ``id`` of
    the bundle). A stack of one block is a view of it: ``stack`` of one tensor would copy it
    every step; safe because the step only reads its gradient stacks."""
    blocks = []
    pieces: dict[int, list[torch.Tensor]] = {}
    for slot in stack.slots:
        key = id(slot.bundle)
        layout = layouts[key]
        if layout is None:
            block = gradients[key]
        else:
            if key not in pieces:
                pieces[key] = layout.split(gradients[key])
            block = pieces[key][slot.block]
        blocks.append(block.reshape(stack.shape))
    return blocks[0].unsqueeze(0) if len(blocks) == 1 else torch.stack(blocks)


def scatter(
    stacks: tuple[Stack, ...],
    results: list[Scaled],
    layouts: dict[int, BlockLayout | None],
) -> dict[int, Scaled]:
    """Per-bundle grouped directions (keyed by ``id`` of the bundle) from per-stack results.

    A bundle of one block keeps its block's factor (as a 0-d tensor); the blocks of a larger
    bundle are scaled before they are merged (the merge copies them anyway).
    """
    pieces: dict[int, dict[int, Scaled]] = {}
    bundles = {}
    for stack, (result, scale) in zip(stacks, results):
        scales = scale.reshape(-1).unbind(0) if isinstance(scale, torch.Tensor) else None
        for position, (slot, block) in enumerate(zip(stack.slots, result.unbind(0))):
            key = id(slot.bundle)
            bundles[key] = slot.bundle
            own = scale if scales is None else scales[position]
            pieces.setdefault(key, {})[slot.block] = (block, own)
    grouped: dict[int, Scaled] = {}
    for key, parts in pieces.items():
        bundle, layout = bundles[key], layouts[key]
        if layout is None or layout.num_blocks == 1:
            block, scale = parts[0]
            grouped[key] = (block.reshape(bundle.grouped_shape), scale)
            continue
        blocks = []
        for index, shape in enumerate(layout.block_shapes):
            part, scale = parts[index]
            unscaled = isinstance(scale, float) and scale == 1.0
            blocks.append((part if unscaled else part * scale).reshape(shape))
        grouped[key] = (layout.merge(blocks), 1.0)
    return grouped
