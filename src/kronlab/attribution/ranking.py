"""Each query's top-k proponents and opponents, kept while score columns stream past.

Scoring ``n_query`` queries against ``n_train`` training examples needs only ``O(n_query · k)``
memory this way: every block of columns ``(n_query, c)`` is merged into the running top-k and
dropped, so no ``n_query × n_train`` matrix exists (``scores.npy`` is optional).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kronlab.optim.validation import check_range

_ARRAYS = ("proponents", "proponent_scores", "opponents", "opponent_scores")


@dataclass(frozen=True)
class RankedScores:
    """Per query: ``proponents`` (train indices of the ``k`` highest scores, descending) and
    ``opponents`` (the ``k`` lowest, ascending), each ``(n_query, k)``, with their scores."""

    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray
    num_train: int

    @property
    def k(self) -> int:
        return self.proponents.shape[1]

    def save(self, path: str | Path) -> None:
        """One ``.npz`` file (written under a temporary name, then renamed)."""
        path = Path(path)
        temporary = path.with_name(path.name + ".tmp.npz")
        np.savez(
            temporary,
            num_train=np.array(self.num_train),
            **{name: getattr(self, name) for name in _ARRAYS},
        )
        temporary.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> RankedScores:
        with np.load(path) as data:
            return cls(**{name: data[name] for name in _ARRAYS}, num_train=int(data["num_train"]))


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (``(n, width)``) divided by their Euclidean norms; a zero row stays zero."""
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    return rows / norms.clamp_min(torch.finfo(rows.dtype).tiny)


class StreamedTopK:
    """Running top-k (both ends) of score columns fed by :meth:`update`, in any order."""

    def __init__(self, k: int) -> None:
        check_range("k", k, 1, integer=True)
        self.k = int(k)
        self.num_train = 0
        self._high: tuple[torch.Tensor, torch.Tensor] | None = None
        self._low: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def empty(self) -> bool:
        return self._high is None

    def update(self, scores: torch.Tensor, start: int) -> None:
        """Merge the columns ``start … start + c`` (``scores`` of shape ``(n_query, c)``)."""
        if scores.ndim != 2:
            raise ValueError(f"Invalid scores shape: {tuple(scores.shape)} (allowed: 2-d)")
        scores = scores.detach().float()
        indices = torch.arange(start, start + scores.shape[1], device=scores.device)
        indices = indices.expand_as(scores)
        self._high = _merge(self._high, (scores, indices), self.k, largest=True)
        self._low = _merge(self._low, (scores, indices), self.k, largest=False)
        self.num_train = max(self.num_train, start + scores.shape[1])

    def merge(self, other: RankedScores) -> None:
        """Fold in another worker's result over other columns of the same queries."""
        high = (torch.from_numpy(other.proponent_scores), torch.from_numpy(other.proponents))
        low = (torch.from_numpy(other.opponent_scores), torch.from_numpy(other.opponents))
        self._high = _merge(self._high, high, self.k, largest=True)
        self._low = _merge(self._low, low, self.k, largest=False)
        self.num_train = max(self.num_train, other.num_train)

    def result(self) -> RankedScores:
        if self._high is None or self._low is None:
            raise ValueError("Invalid StreamedTopK: no scores were added")
        return RankedScores(
            proponents=self._high[1].cpu().numpy(),
            proponent_scores=self._high[0].cpu().numpy(),
            opponents=self._low[1].cpu().numpy(),
            opponent_scores=self._low[0].cpu().numpy(),
            num_train=self.num_train,
        )


def _merge(
    kept: tuple[torch.Tensor, torch.Tensor] | None,
    new: tuple[torch.Tensor, torch.Tensor],
    k: int,
    largest: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = new
    if kept is not None:
        values = torch.cat([kept[0].to(values.device), values], dim=1)
        indices = torch.cat([kept[1].to(indices.device), indices], dim=1)
    best = torch.topk(values, min(k, values.shape[1]), dim=1, largest=largest, sorted=True)
    return best.values, torch.gather(indices, 1, best.indices)
