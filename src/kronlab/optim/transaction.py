"""A step as a transaction: copy the state, update, keep the result only if everything new is
finite; the one mechanism behind ``KronOptimizer.step``'s guarantee that a step leaves finite
parameters and state, or is skipped with both untouched.

Two ways to decide, the same copies and the same test (the gradients and every value the update
wrote must be finite):

* ``StepTransaction.run`` (eager steps): before the update it copies every state tensor and
  parameter into buffers kept from step to step, except those whose copy is still exact (the
  last step did not write them); after it, one finiteness test
  (``kronlab.linalg.finite.all_finite``, one host sync) covers the gradients and the tensors
  the update wrote. Tensors the step did not write (same object, same version counter as when
  last found finite, e.g. eigenvectors between refreshes) are not tested again. A failed test
  puts the copies back.
* ``masked_update`` (``torch.compile``d steps): no host sync and no version counters (a traced
  step can read neither), so everything is copied each step, and the device puts it back with
  ``torch.where(finite, new, old)``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from kronlab.linalg.finite import all_finite, finite_flag

NON_FINITE_GRADIENT = "non-finite gradient"
OVERFLOW = "non-finite value produced by the step (overflow)"


class StepTransaction:
    """Snapshot and verification of an optimizer's state and parameters around one update."""

    def run(
        self,
        state: dict[Any, Any],
        params: Sequence[Tensor],
        gradients: Sequence[Tensor],
        update: Callable[[], None],
    ) -> str | None:
        """Run ``update`` as a transaction. ``None`` when it was committed, else why it was
        refused (``state`` and ``params`` then are as before it). An exception in ``update``
        with finite gradients is raised after the rollback."""
        self.begin(state, params)
        try:
            update()
        except Exception:
            self.rollback(state)
            if all_finite(gradients):
                raise
            return NON_FINITE_GRADIENT  # the update choked on it
        gradients_finite, step_finite = self.commit_if_finite(state, params, gradients)
        if step_finite:
            return None
        self.rollback(state)
        return OVERFLOW if gradients_finite else NON_FINITE_GRADIENT

    def __init__(self) -> None:
        # id(tensor) -> (weak reference to it, its version when copied, the copy)
        self._copies: dict[int, tuple[weakref.ref, int, Tensor]] = {}
        self._verified: dict[int, tuple[weakref.ref, int]] = {}
        self._saved: tuple[Any, list[Tensor], list[Tensor], list[Tensor]] | None = None

    def begin(self, state: dict[Any, Any], params: Sequence[Tensor]) -> None:
        """Copy ``state`` (nested dicts, lists, tuples of tensors and other values) and
        ``params``.

        A tensor whose copy from an earlier step is still exact (same object, same version
        counter: the step did not write it, e.g. eigenvectors between refreshes) is not copied
        again; other copies reuse the buffers of tensors that are gone (no allocation on the
        hot path when a step replaces its state with same-shaped tensors).
        """
        tensors: list[Tensor] = []
        structure = {key: _flatten(value, tensors) for key, value in state.items()}
        tensors.extend(params)
        previous: dict[int, tuple[weakref.ref, int, Tensor]] = self._copies
        copies: dict[int, tuple[weakref.ref, int, Tensor]] = {}
        current = {id(tensor) for tensor in tensors}
        spare: dict[tuple, list[Tensor]] = {}
        for key, (reference, _, copy) in previous.items():
            if key not in current or reference() is None:
                spare.setdefault(_layout(copy), []).append(copy)
        for tensor in tensors:
            entry = previous.get(id(tensor))
            if entry is not None and entry[0]() is tensor:
                if entry[1] == tensor._version:
                    copies[id(tensor)] = entry
                    continue
                copy = entry[2]
            else:
                pool = spare.get(_layout(tensor))
                copy = (
                    pool.pop()
                    if pool
                    else torch.empty_like(tensor)  # same strides: see _layout
                )
            copy.copy_(tensor)
            copies[id(tensor)] = (weakref.ref(tensor), tensor._version, copy)
        self._copies = copies
        state_copies = [copies[id(t)][2] for t in tensors[: len(tensors) - len(params)]]
        param_copies = [copies[id(t)][2] for t in params]
        self._saved = (structure, state_copies, list(params), param_copies)

    def commit_if_finite(
        self, state: dict[Any, Any], params: Sequence[Tensor], gradients: Sequence[Tensor]
    ) -> tuple[bool, bool]:
        """``(gradients finite, new parameters and state finite)``; one host sync when both
        are. Call ``rollback`` when either is False."""
        written: list[Tensor] = []
        current: dict[int, tuple[weakref.ref, int]] = {}
        for tensor in _floating(state) + list(params):
            known = self._verified.get(id(tensor))
            if known is None or known[0]() is not tensor or known[1] != tensor._version:
                written.append(tensor)
            current[id(tensor)] = (weakref.ref(tensor), tensor._version)
        if all_finite(list(gradients) + written):
            self._verified = current
            return True, True
        return all_finite(gradients), False

    def rollback(self, state: dict[Any, Any]) -> None:
        """Put the copies taken by ``begin`` back (the copies become the state)."""
        assert self._saved is not None, "rollback without begin"
        structure, state_copies, params, param_copies = self._saved
        stored = iter(state_copies)
        restored = {key: _unflatten(value, stored) for key, value in structure.items()}
        state.clear()
        state.update(restored)
        for param, copy in zip(params, param_copies):
            param.copy_(copy)
        self._copies = {}  # the copies are the state now
        self._verified = {}
        self._saved = None


def masked_update(
    states: Sequence[dict[str, Any]],
    params: Sequence[Tensor],
    gradients: Sequence[Tensor],
    update: Callable[[], None],
) -> Tensor:
    """Run ``update`` and undo it on the device if a gradient or a value it wrote is not finite;
    return the 0-dim ``finite`` flag. No host sync, so a compiled step has no graph break here.

    ``params`` and every tensor of ``states`` (per-parameter dicts; tensors directly in them or
    in lists) are copied first and restored with ``torch.where(finite, new, old)`` into the
    tensors found at the same places after the update, which costs one copy per step. State
    created by the update (no old value) is kept as the update made it.
    """
    saved_params = [p.detach().clone() for p in params]
    saved = [(holder, key, value.clone()) for holder, key, value in _state_tensors(states)]
    update()
    written = [
        holder[key]
        for holder, key, _ in saved
        if isinstance(holder[key], Tensor) and holder[key].is_floating_point()
    ]
    finite = finite_flag(list(gradients) + list(params) + written)
    for param, old in zip(params, saved_params):
        param.detach().copy_(torch.where(finite, param.detach(), old))
    for holder, key, old in saved:
        new = holder[key]
        if isinstance(new, Tensor) and new.shape == old.shape:
            new.copy_(torch.where(finite, new, old))
    return finite


def _state_tensors(states: Sequence[dict[str, Any]]) -> list[tuple[Any, Any, Tensor]]:
    """``(holder, key, tensor)`` for the tensors of per-parameter state dicts, directly or in a
    list (e.g. one factor per axis)."""
    found: list[tuple[Any, Any, Tensor]] = []
    for state in states:
        for key, value in state.items():
            if isinstance(value, Tensor):
                found.append((state, key, value))
            elif isinstance(value, list):
                found += [
                    (value, i, item) for i, item in enumerate(value) if isinstance(item, Tensor)
                ]
    return found


class _Slot:
    """A tensor's place in a flattened nested structure."""


_SLOT = _Slot()


def _flatten(value: Any, into: list[Tensor]) -> Any:
    if isinstance(value, Tensor):
        into.append(value)
        return _SLOT
    if isinstance(value, dict):
        return {key: _flatten(item, into) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_flatten(item, into) for item in value)
    return value  # immutable, or (like a generator) not rolled back


def _unflatten(value: Any, tensors: Any) -> Any:
    if value is _SLOT:
        return next(tensors)
    if isinstance(value, dict):
        return {key: _unflatten(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_unflatten(item, tensors) for item in value)
    return value


def _layout(tensor: Tensor) -> tuple:
    # Strides included: a copy that becomes the state after a rollback must keep the memory
    # order (e.g. eigh's column-major eigenvectors), or later matmuls round differently.
    return tensor.shape, tensor.stride(), tensor.dtype, tensor.device


def _floating(value: Any) -> list[Tensor]:
    tensors: list[Tensor] = []
    _flatten(value, tensors)
    return [t for t in tensors if t.is_floating_point()]
