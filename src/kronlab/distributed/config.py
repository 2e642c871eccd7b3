"""How an optimizer splits its preconditioner work over the ranks of a process group."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# Communication dtypes that carry an update without surprises: floating, and narrow only where
# the user asks for it.
COMMUNICATION_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class DistributedConfig:
    """Shard an optimizer's preconditioner work over the ranks of ``process_group``.

    Each block of work (a preconditioner bundle) is owned by one rank, chosen by the cost model
    of ``kronlab.distributed.cost``; only the owner keeps its state and computes its step, and
    the results are all-gathered once per step (``kronlab.distributed.communication``).
    FSDP2-sharded (DTensor) parameters are gathered whole on their owner before the step and
    its results scattered back to the shards (``kronlab.distributed.fsdp``); they imply this
    option (the ranks of their mesh) when it is not given.

    Args:
        process_group: the ranks that share the work; ``None`` is the default group (the one
            ``torch.distributed.init_process_group`` made). Every rank of it must step the
            optimizer the same number of times with the same parameters (as under DDP).
        communication_dtype: dtype of the all-gathered updates. ``None`` sends the new parameter
            values in their own dtype: every rank then holds exactly the owner's values (the
            exact mode). A narrower dtype (e.g. ``torch.bfloat16``) sends each step's change
            ``p_new - p_old`` instead, rounded to it, and every rank (the owner too) adds the
            rounded change: ranks stay identical, the update is rounded.
        decomposition_weight: weight of the amortized decomposition cost (``d³`` per factor and
            refresh) against the per-step cost (``numel · Σ d``) in the assignment; 0 balances
            the per-step work only.
        memory_weight: weight of the state size (elements) in the assignment's cost; 0
            balances compute only.
    """

    process_group: dist.ProcessGroup | None = None
    communication_dtype: torch.dtype | None = None
    decomposition_weight: float = 1.0
    memory_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.process_group is not None and not isinstance(self.process_group, dist.ProcessGroup):
            raise ValueError(
                f"Invalid process_group: {self.process_group!r} (allowed: None or a "
                "torch.distributed.ProcessGroup)"
            )
        if self.communication_dtype is not None and (
            self.communication_dtype not in COMMUNICATION_DTYPES
        ):
            allowed = ", ".join(map(str, COMMUNICATION_DTYPES))
            raise ValueError(
                f"Invalid communication_dtype: {self.communication_dtype!r} (allowed: None or "
                f"one of {allowed})"
            )
        for name in ("decomposition_weight", "memory_weight"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value < float("inf")
            ):
                raise ValueError(f"Invalid {name}: {value!r} (allowed: a finite number >= 0)")

    def world(self) -> tuple[int, int]:
        """``(rank, world size)`` in ``process_group``; ``(0, 1)`` without an initialized
        process group (the optimizer then runs undistributed)."""
        if not dist.is_available() or not dist.is_initialized():
            return 0, 1
        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
