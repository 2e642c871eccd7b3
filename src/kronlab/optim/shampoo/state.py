"""Shampoo's state keyed by parameter, computed on as stacks.

The step works on one state dict per stack: ``{"step": t, "factors": [(B, d_i, d_i)], …}``
(integers, ``(B, …)`` tensors, lists of them per block axis). What ``optimizer.state`` holds,
as torch.optim's does, is one entry per bundle under its first parameter:
``state[param]["blocks"][j]`` is block j's dict with the same keys, whose tensors are views
(``[position]``) of the stack's tensors, so no step copies the state. ``StackStates`` keeps the
stack dicts between steps and restacks one from the per-parameter entries when those were
replaced (``load_state_dict``, a step rolled back), which it notices by the identity of the
block dicts it published.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch

from kronlab.optim.step_template import Slot, Stack

BLOCKS = "blocks"
StackState = dict[str, Any]


class StackStates:
    """The stack dicts of an optimizer's plan, published as per-parameter block views."""

    def __init__(self) -> None:
        # stack index -> (the block dicts it was published to, the stack dict, what was
        # published per key: the value itself, or a list's items)
        self._stacks: dict[int, tuple[list[dict], StackState, dict[str, Any]]] = {}

    def get(self, state: MutableMapping, stack: Stack) -> StackState:
        """The stack's state dict: cached, restacked from the slots' block entries, or new."""
        members = [block_entry(state, slot) for slot in stack.slots]
        cached = self._stacks.get(stack.index)
        if cached is not None and all(a is b for a, b in zip(cached[0], members, strict=True)):
            return cached[1]
        stack_state = _restack(members)
        self._stacks[stack.index] = (members, stack_state, {})
        self.publish(stack)
        return stack_state

    def publish(self, stack: Stack) -> None:
        """Write what the step changed in the stack dict into its slots' block dicts (views)."""
        members, stack_state, published = self._stacks[stack.index]
        for key, value in stack_state.items():
            seen = published.get(key)
            if isinstance(value, list):
                if seen is not None and len(seen) == len(value) and all(map(_same, seen, value)):
                    continue
                per_item = [item.unbind(0) for item in value]
                for position, member in enumerate(members):
                    member[key] = [views[position] for views in per_item]
                published[key] = list(value)
            elif isinstance(value, torch.Tensor):
                if seen is value:
                    continue
                for member, view in zip(members, value.unbind(0)):
                    member[key] = view
                published[key] = value
            elif seen != value or key not in published:
                for member in members:
                    member[key] = value
                published[key] = value

    def clear(self) -> None:
        self._stacks.clear()


def block_entry(state: MutableMapping, slot: Slot) -> dict[str, Any]:
    """Block ``slot.block``'s dict in the state of the slot's bundle (created empty)."""
    blocks = state[slot.param].setdefault(BLOCKS, [])
    while len(blocks) <= slot.block:
        blocks.append({})
    return blocks[slot.block]


def _same(a: object, b: object) -> bool:
    return a is b


def _restack(members: list[dict[str, Any]]) -> StackState:
    """A stack dict from its blocks' dicts (empty before the first step)."""
    stack_state: StackState = {}
    for key, value in members[0].items():
        if isinstance(value, list):
            stack_state[key] = [
                _stack_like([member[key][axis] for member in members]) for axis in range(len(value))
            ]
        elif isinstance(value, torch.Tensor):
            stack_state[key] = _stack_like([member[key] for member in members])
        else:  # counters: the same for every block of a stack
            stack_state[key] = value
    return stack_state


def _stack_like(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` keeping the members' memory layout: eigenvectors come column-major from
    LAPACK, and the products they enter round differently in the other layout, which would
    make a resumed run drift from the uninterrupted one."""
    first = tensors[0]
    if first.ndim >= 2 and not first.is_contiguous() and first.mT.is_contiguous():
        return torch.stack([tensor.mT for tensor in tensors]).mT
    return torch.stack(tensors)
