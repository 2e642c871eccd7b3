"""A step as a transaction: copy the state, update, commit only if everything new is finite.

``StepTransaction`` backs the guarantee of ``KronOptimizer.step``: a step leaves finite
parameters and state, or is skipped with both untouched. Before the update it copies every
state tensor and parameter into buffers kept from step to step (no allocation on the hot path);
after it, one finiteness test (``kronlab.linalg.finite.all_finite``, one host sync) covers the
gradients and the tensors the update wrote. Tensors the step did not write (same object, same
version counter as when last found finite, e.g. eigenvectors between refreshes) are not tested
again. A failed test puts the copies back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kronlab.linalg.finite import all_finite


class StepTransaction:
    """Snapshot and verification of an optimizer's state and parameters around one update."""

    def __init__(self) -> None:
        self._buffers: list[Tensor] = []
        self._verified: dict[int, tuple[Tensor, int]] = {}
        self._saved: tuple[Any, list[Tensor], list[Tensor]] | None = None

    def begin(self, state: dict[Any, Any], params: Sequence[Tensor]) -> None:
        """Copy ``state`` (nested dicts, lists, tuples of tensors and other values) and
        ``params``."""
        tensors: list[Tensor] = []
        structure = {key: _flatten(value, tensors) for key, value in state.items()}
        tensors.extend(params)
        if len(self._buffers) != len(tensors) or any(
            _layout(buffer) != _layout(tensor) for buffer, tensor in zip(self._buffers, tensors)
        ):
            self._buffers = [
                torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors
            ]
        for buffer, tensor in zip(self._buffers, tensors):
            buffer.copy_(tensor)
        self._saved = (structure, self._buffers[: len(tensors) - len(params)], list(params))

    def commit_if_finite(
        self, state: dict[Any, Any], params: Sequence[Tensor], gradients: Sequence[Tensor]
    ) -> tuple[bool, bool]:
        """``(gradients finite, new parameters and state finite)``; one host sync when both
        are. Call ``rollback`` when either is False."""
        written: list[Tensor] = []
        current: dict[int, tuple[Tensor, int]] = {}
        for tensor in _floating(state) + list(params):
            known = self._verified.get(id(tensor))
            if known is None or known[0] is not tensor or known[1] != tensor._version:
                written.append(tensor)
            current[id(tensor)] = (tensor, tensor._version)
        if all_finite(list(gradients) + written):
            self._verified = current
            return True, True
        return all_finite(gradients), False

    def rollback(self, state: dict[Any, Any]) -> None:
        """Put the copies taken by ``begin`` back (the copies become the state)."""
        assert self._saved is not None, "rollback without begin"
        structure, copies, params = self._saved
        stored = iter(copies)
        restored = {key: _unflatten(value, stored) for key, value in structure.items()}
        state.clear()
        state.update(restored)
        for param, copy in zip(params, self._buffers[len(copies) :]):
            param.copy_(copy)
        self._buffers = []  # now owned by the state
        self._verified = {}
        self._saved = None


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
    return tensor.shape, tensor.dtype, tensor.device


def _floating(value: Any) -> list[Tensor]:
    tensors: list[Tensor] = []
    _flatten(value, tensors)
    return [t for t in tensors if t.is_floating_point()]
