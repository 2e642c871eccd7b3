"""Per-bundle optimizer state kept as views of one stacked tensor per stack of same-work slots.

Batched optimizers (PSGD, Spectron, SIRFShampoo) work on ``(B, …)`` stacks of the state of
``B`` same-layout bundles (the step template's stacks). Restacking every step copies all of
that state; instead, the per-bundle entries are made views of the stack, so the next step finds
the stack unchanged and reuses it (no copy). In-place changes to an entry are changes to the
stack; replacing an entry (e.g. ``load_state_dict``) simply triggers one restack. Nothing here
is saved: ``state_dict`` holds the per-bundle views.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor


class StackedState:
    """Cache of stacked state tensors and of tensors derived from them (e.g. ``Q²``)."""

    def __init__(self) -> None:
        self._stacks: dict[Hashable, tuple[tuple[Tensor, ...], Tensor]] = {}
        self._derived: dict[Hashable, tuple[Tensor, int, Tensor]] = {}

    def stack(
        self, key: Hashable, states: Sequence[dict[str, Any]], name: str, index: int | None = None
    ) -> Tensor:
        """``torch.stack([state[name] for state in states])`` (``state[name][index]`` for list
        entries), without a copy when cached."""
        entries = [state[name] if index is None else state[name][index] for state in states]
        cached = self._stacks.get(key)
        if (
            cached is not None
            and len(cached[0]) == len(entries)
            and all(view is entry for view, entry in zip(cached[0], entries))
        ):
            return cached[1]
        return self.store(key, states, name, torch.stack(entries), index)

    def store(
        self,
        key: Hashable,
        states: Sequence[dict[str, Any]],
        name: str,
        stacked: Tensor,
        index: int | None = None,
    ) -> Tensor:
        """Make ``state[name]`` (``state[name][index]``) of each state a view of ``stacked`` and
        cache it under ``key``."""
        views = stacked.unbind(0)
        for state, view in zip(states, views):
            if index is None:
                state[name] = view
            else:
                state[name][index] = view
        self._stacks[key] = (views, stacked)
        return stacked

    def derived(self, key: Hashable, source: Tensor) -> Tensor | None:
        """The tensor stored by ``store_derived`` if ``source`` is the same, unmodified tensor.

        Under ``torch.compile`` nothing is cached (a compiled step cannot read ``_version``;
        the compiler reuses or recomputes the derived value itself).
        """
        if torch.compiler.is_compiling():
            return None
        cached = self._derived.get(key)
        if cached is not None and cached[0] is source and cached[1] == source._version:
            return cached[2]
        return None

    def store_derived(self, key: Hashable, source: Tensor, value: Tensor) -> None:
        """Remember ``value`` as computed from ``source`` in its current version."""
        if torch.compiler.is_compiling():
            return
        self._derived[key] = (source, source._version, value)
