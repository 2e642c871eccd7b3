"""A step as a transaction: copy the state, update, keep the result only if everything new is
finite; the one mechanism behind ``KronOptimizer.step``'s guarantee that a step leaves finite
parameters and state, or is skipped with both untouched.

Two ways to decide, the same copies and the same test (the gradients and every value the update
wrote must be finite):

* ``StepTransaction.run`` (eager steps): before the update it copies every state tensor and
  parameter into buffers kept from step to step (a buffer that state views tile, such as a
  stack of per-block factors, as one tensor), except those whose copy is still exact (the
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

import operator
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
        self._saved: (
            tuple[Any, list[tuple[Tensor, tuple | None]], list[Tensor], list[Tensor]] | None
        ) = None
        # the layout of the state last seen (by begin or commit_if_finite), reused while the
        # state holds the same tensor objects: a step usually writes its state in place
        self._layout: _StateLayout | None = None

    def begin(self, state: dict[Any, Any], params: Sequence[Tensor]) -> None:
        """Copy ``state`` (nested dicts, lists, tuples of tensors and other values) and
        ``params``.

        State tensors that are views tiling one buffer (e.g. the per-block views of a stacked
        factor) are copied as that buffer, once; on rollback their copies are views of the
        buffer's copy at the same offsets, with the same strides. A tensor whose copy from an
        earlier step is still exact (same object, same version counter: the step did not write
        it, e.g. eigenvectors between refreshes) is not copied again; other copies reuse the
        buffers of tensors that are gone (no allocation on the hot path when a step replaces
        its state with same-shaped tensors).
        """
        tensors: list[Tensor] = []
        structure = {key: _flatten(value, tensors) for key, value in state.items()}
        layout = self._layout_of(tensors)
        sources = layout.units + list(params)
        previous: dict[int, tuple[weakref.ref, int, Tensor]] = self._copies
        copies: dict[int, tuple[weakref.ref, int, Tensor]] = {}
        current = {id(tensor) for tensor in sources}
        spare: dict[tuple, list[Tensor]] = {}
        for key, (reference, _, copy) in previous.items():
            if key not in current or reference() is None:
                spare.setdefault(_layout(copy), []).append(copy)
        for tensor in sources:
            if id(tensor) in copies:  # listed twice (a parameter also held in the state)
                continue
            entry = previous.get(id(tensor))
            if entry is not None and entry[0]() is tensor:
                if entry[1] == tensor._version:
                    copies[id(tensor)] = entry
                    continue
                copy = entry[2]
            else:
                pool = spare.get(_layout(tensor))
                copy = pool.pop() if pool else torch.empty_like(tensor)  # strides: see _layout
            copy.copy_(tensor)
            copies[id(tensor)] = (weakref.ref(tensor), tensor._version, copy)
        self._copies = copies
        unit_copies = [copies[id(unit)][2] for unit in layout.units]
        state_copies = [(unit_copies[unit], geometry) for unit, geometry in layout.places]
        param_copies = [copies[id(t)][2] for t in params]
        self._saved = (structure, state_copies, list(params), param_copies)

    def commit_if_finite(
        self, state: dict[Any, Any], params: Sequence[Tensor], gradients: Sequence[Tensor]
    ) -> tuple[bool, bool]:
        """``(gradients finite, new parameters and state finite)``; one host sync when both
        are. Call ``rollback`` when either is False."""
        tensors: list[Tensor] = []
        for value in state.values():
            _flatten(value, tensors)
        # a buffer tiled by views is tested once, which tests exactly the views' entries
        units = [unit for unit in self._layout_of(tensors).units if unit.is_floating_point()]
        written: list[Tensor] = []
        current: dict[int, tuple[weakref.ref, int]] = {}
        for tensor in units + list(params):
            known = self._verified.get(id(tensor))
            if known is None or known[0]() is not tensor or known[1] != tensor._version:
                written.append(tensor)
            current[id(tensor)] = (weakref.ref(tensor), tensor._version)
        if all_finite(list(gradients) + written):
            self._verified = current
            return True, True
        return all_finite(gradients), False

    def _layout_of(self, tensors: list[Tensor]) -> _StateLayout:
        """The layout of the flattened state ``tensors``: the last one while the state holds the
        same tensor objects (their shapes and strides are not changed in place), else new."""
        layout = self._layout
        if layout is None or not layout.describes(tensors):
            layout = self._layout = _StateLayout(tensors)
        return layout

    def rollback(self, state: dict[Any, Any]) -> None:
        """Put the copies taken by ``begin`` back (the copies become the state)."""
        assert self._saved is not None, "rollback without begin"
        structure, state_copies, params, param_copies = self._saved
        # views of one buffer's copy share it as they shared the buffer
        stored = iter(
            copy if geometry is None else _view_of_copy(copy, geometry)
            for copy, geometry in state_copies
        )
        restored = {key: _unflatten(value, stored) for key, value in structure.items()}
        state.clear()
        state.update(restored)
        for param, copy in zip(params, param_copies):
            param.copy_(copy)
        self._copies = {}  # the copies are the state now
        self._layout = None
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

    ``params`` and every tensor of ``states`` (per-parameter dicts, nested dicts and lists
    included) are copied first and restored with ``torch.where(finite, new, old)`` into the
    tensors found at the same places after the update (which may have replaced them, e.g. an
    eigenbasis refresh), which costs one copy per step. State created by the update (no old
    value) is kept as the update made it.
    """
    saved_params = [p.detach().clone() for p in params]
    saved = [(root, path, value.clone()) for root, path, value in _state_tensors(states)]
    update()
    # read again by path: the update may have put new tensors (or lists of them) in the state
    written = [(_at(root, path), old) for root, path, old in saved]
    finite = finite_flag(
        list(gradients)
        + list(params)
        + [new for new, _ in written if isinstance(new, Tensor) and new.is_floating_point()]
    )
    for param, old in zip(params, saved_params):
        param.detach().copy_(torch.where(finite, param.detach(), old))
    for new, old in written:
        if isinstance(new, Tensor) and new.shape == old.shape:
            new.copy_(torch.where(finite, new, old))
    return finite


# The same, never traced: a compiled step calls it where the update runs eagerly.
eager_masked_update = torch.compiler.disable(masked_update)


def _state_tensors(states: Sequence[dict[str, Any]]) -> list[tuple[dict, tuple, Tensor]]:
    """``(state, path, tensor)`` for every tensor of per-parameter state dicts, at any depth
    of nested dicts and lists (e.g. one factor per axis, Shampoo's per-block dicts); ``path``
    is the keys and indices that lead to it from ``state``."""
    found: list[tuple[dict, tuple, Tensor]] = []
    pending: list[tuple[dict, tuple, Any]] = [(state, (), state) for state in states]
    while pending:
        root, path, value = pending.pop()
        if isinstance(value, Tensor):
            found.append((root, path, value))
        elif isinstance(value, dict):
            pending += [(root, (*path, key), item) for key, item in value.items()]
        elif isinstance(value, list):
            pending += [(root, (*path, index), item) for index, item in enumerate(value)]
    return found


def _at(root: dict, path: tuple) -> Any:
    """What ``root`` holds at ``path`` now (``None`` where the path no longer leads)."""
    value: Any = root
    for key in path:
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and isinstance(key, int) and key < len(value):
            value = value[key]
        else:
            return None
    return value


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


def _view_of_copy(copy: Tensor, geometry: tuple) -> Tensor:
    """The view of a buffer's copy at the place (shape, strides, offset from the buffer's
    start) where a view of the buffer was."""
    shape, stride, offset = geometry
    return copy.as_strided(shape, stride, copy.storage_offset() + offset)


class _StateLayout:
    """What a transaction copies and tests for a flattened state: its ``units`` (the buffers
    that views tile, then the other tensors, each once) and, per state tensor, ``places``:
    ``(index of its unit, None)``, or ``(index of its buffer, (shape, strides, offset))`` for a
    view of a tiled buffer."""

    def __init__(self, tensors: list[Tensor]) -> None:
        self.tensors = tensors
        tiled = _tiled_buffers(tensors)
        self.units: list[Tensor] = []
        index: dict[int, int] = {}
        self.places: list[tuple[int, tuple | None]] = []
        for tensor in tensors:
            base = tensor._base
            if base is not None and id(base) in tiled:
                geometry = (
                    tuple(tensor.shape),
                    tensor.stride(),
                    tensor.storage_offset() - base.storage_offset(),
                )
                tensor = base
            else:
                geometry = None
            unit = index.get(id(tensor))
            if unit is None:
                unit = index[id(tensor)] = len(self.units)
                self.units.append(tensor)
            self.places.append((unit, geometry))

    def describes(self, tensors: list[Tensor]) -> bool:
        return len(tensors) == len(self.tensors) and all(map(operator.is_, tensors, self.tensors))


def _tiled_buffers(tensors: list[Tensor]) -> set[int]:
    """The ids of the buffers that several of ``tensors`` tile, as equal dense views at
    consecutive offsets (e.g. the per-block views ``stack.unbind(0)`` of a stacked factor),
    each listed once or more. Only contiguous buffers of the views' dtype, so that
    ``_view_of_copy`` of the buffer's copy is an exact copy of each view."""
    members: dict[int, list[Tensor]] = {}
    for tensor in tensors:
        if tensor._base is not None:
            members.setdefault(id(tensor._base), []).append(tensor)
    tiled = set()
    for key, views in members.items():
        base = views[0]._base
        assert base is not None
        first = views[0]
        shape, stride, size = first.shape, first.stride(), first.numel()
        if len(views) < 2 or not size or not base.is_contiguous() or not _dense(first):
            continue
        offsets = set()
        for view in views:
            if view.shape != shape or view.stride() != stride or view.dtype != base.dtype:
                break
            offsets.add(view.storage_offset())
        else:
            start = base.storage_offset()
            if sorted(offsets) == list(range(start, start + base.numel(), size)):
                tiled.add(key)
    return tiled


def _dense(tensor: Tensor) -> bool:
    """Whether ``tensor``'s entries fill one run of memory, each once (dims in any order)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(tensor.shape, tensor.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True
