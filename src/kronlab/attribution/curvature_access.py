"""The pipeline's curvature fit over indexable batches, on one process or several ranks.

Batch ``k`` belongs to rank ``k mod N``; :func:`kronlab.attribution.fit_curvature` with the
ranks' :class:`~kronlab.attribution.distributed.Workers` as its reducer all-reduces the
statistics, so every rank ends with the curvature one process would fit on all the batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kronlab.attribution.curvature import Curvature
from kronlab.attribution.distributed import Workers
from kronlab.attribution.fit import fit_curvature

MaskFn = Callable[[Any], torch.Tensor | None]


def fit(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: Callable[..., torch.Tensor],
    modules: Mapping[str, nn.Module],
    *,
    method: str,
    fisher: str,
    mask_fn: MaskFn,
    workers: Workers,
    seed: int = 0,
) -> Curvature:
    """The curvature of ``model`` on all ``batches``, whatever the number of ranks.

    ``batches`` is indexable and may carry a ``progress`` bar, advanced by every rank's share
    of each fit pass (scaled by the world size, so rank 0's bar tracks the whole pass).
    """
    return fit_curvature(
        model,
        _OwnedBatches(batches, workers),
        loss_fn,
        method,
        list(modules),
        fisher,
        mask_fn=mask_fn,
        seed=seed,
        reducer=workers,
    )


class _OwnedBatches:
    """This rank's batches of ``batches``, re-read on every iteration (one per fit pass)."""

    def __init__(self, batches: Sequence[Any], workers: Workers) -> None:
        self.batches, self.workers = batches, workers
        self.progress = getattr(batches, "progress", None)

    def __iter__(self) -> Iterator[Any]:
        for index in self.workers.owned(range(len(self.batches))):
            batch = self.batches[index]
            yield batch
            if self.progress is not None:
                self.progress.update(len(batch[0]) * self.workers.world_size)
