"""Full-shape stand-ins through which a rank steps the FSDP2-sharded parameters it owns.

Under ``fully_shard`` each parameter is a DTensor of which every rank holds one shard, but a
preconditioner bundle needs its whole block. The owner of a bundle therefore steps plain
tensors of the full shape (``FullViews.proxies``), kept from step to step: before the update it
fills them with the full values and gradients (``kronlab.distributed.fsdp.gather_to_owners``),
during the update its bundles hold the stand-ins in place of the DTensors (``FullViews.swapped``;
the bundles stay the same objects, so everything keyed by bundle still finds them), and
afterwards every rank writes its shard of the owners' results
(``kronlab.distributed.fsdp.scatter_from_owners``). Between steps the bundles hold the DTensors
and the state is keyed by them, so ``state_dict`` and ``torch.distributed.checkpoint`` see the
model's parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from kronlab.distributed.fsdp import (
    LAYOUT_ALLOWED,
    ShardLayout,
    gather_to_owners,
    scatter_from_owners,
    shard_layout,
)

if TYPE_CHECKING:
    import torch.distributed as dist

    from kronlab.optim.base import KronOptimizer
    from kronlab.optim.bundles import ParameterBundle


def sharded_parameters(optimizer: KronOptimizer) -> list[DTensor]:
    """The DTensor parameters of ``optimizer`` with entries, in parameter order."""
    return [
        p
        for group in optimizer.param_groups
        for p in group["params"]
        if isinstance(p, DTensor) and p.numel() > 0
    ]


def check_layouts(optimizer: KronOptimizer, group: dist.ProcessGroup | None) -> list[ShardLayout]:
    """The shard layout of each DTensor parameter over ``group``; ``TypeError`` naming the first
    one whose layout cannot be exchanged."""
    layouts = []
    for param in sharded_parameters(optimizer):
        layout = shard_layout(param, group)
        if layout is None:
            raise TypeError(
                f"Invalid parameter {optimizer.parameter_name(param)}: a DTensor with placements "
                f"{tuple(param.placements)} on a {param.device_mesh.ndim}-D mesh of ranks "
                f"{param.device_mesh.mesh.flatten().tolist()} (allowed: plain tensors, or "
                f"{LAYOUT_ALLOWED}, over the ranks of distributed='s process group)"
            )
        layouts.append(layout)
    return layouts


class FullViews:
    """The full-shape stand-ins of the DTensor parameters of the bundles this rank owns."""

    def __init__(
        self,
        optimizer: KronOptimizer,
        owners: tuple[int, ...],
        rank: int,
        world_size: int,
        group: dist.ProcessGroup | None,
    ) -> None:
        self.rank, self.world_size, self.group = rank, world_size, group
        self.params = sharded_parameters(optimizer)
        self.layouts = check_layouts(optimizer, group)
        owner_of = {
            id(p): owners[index]
            for index, bundle in enumerate(optimizer.bundles)
            for p in bundle.params
        }
        self.owners = [owner_of[id(p)] for p in self.params]
        self.proxies: dict[int, nn.Parameter] = {
            id(p): nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=p.device))
            for p, owner in zip(self.params, self.owners)
            if owner == rank
        }
        self.bundles: list[ParameterBundle] = [
            bundle
            for index, bundle in enumerate(optimizer.bundles)
            if owners[index] == rank and any(id(p) in self.proxies for p in bundle.params)
        ]

    def stand_in(self, param: Tensor) -> Tensor:
        """What this rank steps for ``param``: its stand-in, or ``param`` itself."""
        return self.proxies.get(id(param), param)

    def gather(self) -> None:
        """Fill the stand-ins with the full values and gradients (a collective: every rank
        calls it)."""
        full = [self.proxies.get(id(p)) for p in self.params]
        gradients = gather_to_owners(
            self.params, self.layouts, self.owners, full, self.rank, self.world_size, self.group
        )
        for proxy, gradient in zip(full, gradients):
            if proxy is not None:
                proxy.grad = gradient

    def release(self) -> None:
        """Drop the full gradients (memory of one full copy of the owned parameters)."""
        for proxy in self.proxies.values():
            proxy.grad = None

    def scatter(self, dtype: torch.dtype | None, old: dict[int, Tensor] | None) -> None:
        """Write every rank's shards of the owners' new values, or, given the stand-ins' values
        before the step (``old``, by ``id`` of the stand-in), add the owners' changes rounded to
        ``dtype`` (a collective)."""
        full = [self.proxies.get(id(p)) for p in self.params]
        if old is not None:
            full = [None if new is None else new - old[id(new)] for new in full]
        scatter_from_owners(
            self.params,
            self.layouts,
            self.owners,
            full,
            self.rank,
            self.world_size,
            self.group,
            dtype=dtype,
            add=old is not None,
        )

    @contextmanager
    def swapped(self, state: dict) -> Iterator[None]:
        """The owned bundles hold the stand-ins, and their state is keyed by them, inside the
        block; as before on leaving it (also on an exception)."""
        originals = [bundle.params for bundle in self.bundles]
        for bundle, params in zip(self.bundles, originals):
            _rekey(state, params, [self.stand_in(p) for p in params])
            # frozen dataclass: the same object keeps its identity for everything keyed by it
            object.__setattr__(bundle, "params", tuple(self.stand_in(p) for p in params))
        try:
            yield
        finally:
            for bundle, params in zip(self.bundles, originals):
                object.__setattr__(bundle, "params", params)
                _rekey(state, [self.stand_in(p) for p in params], params)


def _rekey(
    state: dict, old: list[Tensor] | tuple[Tensor, ...], new: list[Tensor] | tuple[Tensor, ...]
) -> None:
    """Move the state entries of ``old[i]`` to ``new[i]`` (the same dicts, not copies)."""
    for before, after in zip(old, new):
        if before is not after and before in state:
            state[after] = state.pop(before)


__all__ = ["FullViews", "check_layouts", "sharded_parameters"]
