"""Sharding an optimizer's preconditioner work over the ranks of ``torch.distributed``.

``DistributedConfig`` (the optimizers' ``distributed=`` option), the cost model that sizes each
unit of work, the assignment of work to ranks and the collectives of a sharded step
(``communication``; ``fsdp`` for FSDP2-sharded parameters). This package depends on torch only;
the optimizers use it.
"""

from kronlab.distributed.assignment import Assignment, assign_work
from kronlab.distributed.config import DistributedConfig
from kronlab.distributed.cost import OrthogonalizationItem, WorkItem, kronecker_item

__all__ = [
    "Assignment",
    "DistributedConfig",
    "OrthogonalizationItem",
    "WorkItem",
    "assign_work",
    "kronecker_item",
]
