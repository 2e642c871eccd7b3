"""One batch from several stacks of same-size matrices."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def concatenate_matrices(stacks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``cat`` of stacks along dim 0, the batch (one stack: itself, no copy).

    Column-major matrix stacks (eigenvectors as LAPACK returns them) stay column-major: a
    plain ``cat`` would transpose every entry into a row-major result.
    """
    if len(stacks) == 1:
        return stacks[0]
    if all(s.ndim >= 3 and not s.is_contiguous() and s.mT.is_contiguous() for s in stacks):
        return torch.cat([s.mT for s in stacks]).mT
    return torch.cat(list(stacks))
