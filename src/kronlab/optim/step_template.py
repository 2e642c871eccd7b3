"""The pieces of the step every kronlab optimizer follows: plan → direction → momentum → apply.

``KronOptimizer.update`` reads top to bottom (optax's chain, torch.optim's functional kernels):

1. **Plan** (``StackPlan``, built once, rebuilt after ``add_param_group``): every bundle says what
   work it needs, one ``Work`` (shape, dtype, method key) per block: one block for most methods,
   several for Shampoo's blocking. Blocks with equal ``(param group, Work, device)`` form one
   ``Stack``; each of its ``Slot``\\ s names the bundle (so the parameter whose ``state`` entry
   holds it) and the block index. A method's batched math runs once per stack.
2. **Direction** (the method's own code, ``KronOptimizer.direction``): gradients of the stack's
   slots in, a ``Direction`` out (values in the work shape, a step size and an optional
   per-slot scale that the write multiplies in).
3. **Momentum** (``momentum_``, the one implementation): an EMA ``B ← βB + (1−β)X`` (optionally
   Nesterov) or heavy ball ``B ← βB + X``, on the gradient or on the direction.
4. **Apply** (``apply_direction``, the one parameter write): decoupled weight decay
   ``p ← p(1 − lr·wd)``, then ``p ← p − step·scale·d``, batched with ``torch._foreach_*``.

Auxiliary parameters (those a matrix method does not handle) take ``kronlab.optim.adamw``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kronlab.optim.bundles import ParameterBundle


@dataclass(frozen=True)
class Work:
    """What a method computes on one block: its shape, dtype and anything else that must agree
    for blocks to share a batched call (``key``, e.g. PSGD's factor kinds)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    key: Hashable = None


@dataclass(frozen=True, eq=False)
class Slot:
    """Block ``block`` of ``bundle``: one entry of a stack."""

    bundle: ParameterBundle
    block: int = 0

    @property
    def param(self) -> nn.Parameter:
        """The parameter whose ``optimizer.state`` entry holds this slot's state."""
        return self.bundle.key


@dataclass(frozen=True, eq=False)
class Stack:
    """Same-work slots of one param group and device, computed as one ``(B, *work.shape)``
    batch."""

    index: int
    group_index: int
    work: Work
    device: torch.device
    slots: tuple[Slot, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.work.shape

    def active(self) -> list[Slot]:
        """The slots whose bundle has a gradient this step."""
        return [slot for slot in self.slots if slot.bundle.has_gradient()]


@dataclass(frozen=True)
class StackPlan:
    """Every block of every bundle, gathered into stacks (in order of first appearance)."""

    stacks: tuple[Stack, ...]

    @classmethod
    def build(
        cls,
        bundles: Sequence[ParameterBundle],
        work: Callable[[ParameterBundle], Sequence[Work]],
    ) -> StackPlan:
        """Group the blocks ``work(bundle)`` of ``bundles`` by ``(param group, Work, device)``."""
        members: dict[tuple, list[Slot]] = {}
        for bundle in bundles:
            for block, item in enumerate(work(bundle)):
                key = (bundle.group_index, item, bundle.key.device)
                members.setdefault(key, []).append(Slot(bundle, block))
        stacks = tuple(
            Stack(index, group_index, item, device, tuple(slots))
            for index, ((group_index, item, device), slots) in enumerate(members.items())
        )
        return cls(stacks)


@dataclass
class Direction:
    """A method's direction for the active slots of a stack: ``p ← p − step_size·scale·d``.

    ``values``: a ``(B, *shape)`` stack or one tensor per slot, in the work shape (reshaped to
    each bundle's grouped shape by the write); an entry ``None`` leaves its slot to weight
    decay alone (e.g. PSGD before a bundle's first non-zero gradient). ``scale``: per-slot
    factors known only on the device (e.g. an RMS clip; ``(B,)`` or one 0-dim tensor per slot),
    multiplied in by the write's own pass, or ``None``.
    """

    values: Tensor | Sequence[Tensor | None]
    step_size: float
    scale: Tensor | Sequence[Tensor | None] | None = None


def momentum_(
    buffers: Sequence[Tensor],
    values: Sequence[Tensor],
    beta: float,
    *,
    ema: bool = True,
    nesterov: bool = False,
) -> list[Tensor]:
    """Update the momentum ``buffers`` in place with ``values``; return what the step uses.

    ``ema``: ``B ← βB + (1−β)X`` (as a ``lerp``; torch.optim.Muon's form), which Nesterov turns
    into ``(1−β)X + βB``; else heavy ball ``B ← βB + X`` (torch.optim.SGD, no dampening).
    Returns the buffers themselves unless Nesterov (then new tensors).
    """
    buffers, values = list(buffers), list(values)
    if ema:
        torch._foreach_lerp_(buffers, values, 1 - beta)
        return torch._foreach_lerp(values, buffers, beta) if nesterov else buffers
    if nesterov:
        raise ValueError("Invalid nesterov: True (allowed: only with the EMA form of momentum)")
    torch._foreach_mul_(buffers, beta)
    torch._foreach_add_(buffers, values)
    return buffers


def apply_direction(slots: Sequence[Slot], direction: Direction, decay: float = 0.0) -> None:
    """The parameter write: ``p ← p(1 − decay)`` then ``p ← p − step·scale·d`` for every
    parameter of ``slots`` with a gradient (bundle members without one do not move).

    ``decay`` is ``lr · weight_decay`` (decoupled weight decay, Loshchilov & Hutter, 2019). The
    update is added in its own dtype and rounded once to the parameter's (a float16 parameter
    may take a large update times a small step). Single-block bundles only: a method with
    several blocks per bundle assembles the grouped direction first.
    """
    scales = direction.scale
    if isinstance(scales, Tensor):
        scales = scales.unbind(0)
    decayed: list[Tensor] = []
    params: list[Tensor] = []
    updates: list[Tensor] = []
    owners: list[int] = []
    for index, (slot, value) in enumerate(zip(slots, direction.values)):
        bundle = slot.bundle
        stepped = [param.grad is not None for param in bundle.params]
        decayed += [param for param, has in zip(bundle.params, stepped) if has]
        if value is None:
            continue
        pieces = bundle.split(value.reshape(bundle.grouped_shape))
        for param, update, has in zip(bundle.params, pieces, stepped):
            if has:
                params.append(param)
                updates.append(update)
                owners.append(index)
    if decay != 0 and decayed:
        torch._foreach_mul_(decayed, 1 - decay)
    if not params:
        return
    if scales is None:
        torch._foreach_add_(params, updates, alpha=-direction.step_size)
        return
    for param, update, owner in zip(params, updates, owners):
        param.addcmul_(update, scales[owner], value=-direction.step_size)


def stacked(values: Tensor | Sequence[Tensor]) -> Tensor:
    """``values`` as one ``(B, …)`` tensor (a stack passes through without a copy)."""
    return values if isinstance(values, Tensor) else torch.stack(list(values))
