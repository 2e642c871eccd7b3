"""Influence scores of queries against training examples, streamed over the training data.

``score(q, t) = Σ_modules ⟨(H + λI)⁻¹ G_q, G_t⟩`` (Koh & Liang 2017; Grosse et al. 2023): a
positive score means training on ``t`` lowers the query's loss. Query gradients are
preconditioned once; training gradients are formed batch by batch and discarded, so memory is
``O((n_query + batch) · parameters)`` for any number of training examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import nn
from tqdm.auto import tqdm

from kronlab.attribution.curvature import Curvature
from kronlab.attribution.fit import MaskFn, default_mask
from kronlab.attribution.ranking import RankedScores, StreamedTopK
from kronlab.curvature import bias_in_curvature, per_example_gradients
from kronlab.linalg.finite import all_finite
from kronlab.optim.validation import check_choice, check_loss_fn, check_module, check_range

if TYPE_CHECKING:  # Python 3.10's typing has neither (annotations stay unevaluated)
    from typing_extensions import Required, Unpack

NORMALIZATIONS = ("none", "unit", "relative")


class ScoreOptions(TypedDict, total=False):
    """The keyword arguments of :func:`influence_scores` and :func:`influence_top_k`."""

    model: Required[nn.Module]
    loss_fn: Required[Callable[[nn.Module, Any], torch.Tensor]]
    query_loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None
    damping: float | None
    damping_factor: float | None
    normalize: str
    mask_fn: MaskFn | None
    progress: bool


def influence_scores(
    curvature: Curvature,
    query_data: Iterable[Any],
    train_data: Iterable[Any],
    **options: Unpack[ScoreOptions],
) -> torch.Tensor:
    """``(n_query, n_train)`` influence scores; ``data`` are iterables of batches.

    ``loss_fn(model, batch)`` is the summed training loss (``query_loss_fn``, default the same,
    is the measurement on queries). ``normalize``: ``"none"``; ``"unit"`` scales both gradients
    to unit norm first (cosine-like, Xia et al. 2024); ``"relative"`` divides by the training
    example's self-influence ``√⟨G_t, H⁻¹G_t⟩`` (RelatIF, Barshan et al. 2020).
    ``damping`` / ``damping_factor`` as in :meth:`Curvature.inverse_hvp`.
    Never returns inf or NaN: non-finite gradients, a damping that leaves ``H + λI`` singular
    (``damping=0`` on zero eigenvalues) and overflowing scores raise ``ValueError``.
    """
    columns = _score_columns(curvature, query_data, train_data, **options)
    return torch.cat([block for _, block in columns], dim=1)


def influence_top_k(
    curvature: Curvature,
    query_data: Iterable[Any],
    train_data: Iterable[Any],
    k: int,
    **options: Unpack[ScoreOptions],
) -> RankedScores:
    """Each query's ``k`` strongest proponents and opponents, the same as :func:`top_k` of
    :func:`influence_scores` (same arguments), without the ``n_query × n_train`` matrix: each
    batch's score columns are merged into a running top-k and dropped."""
    check_range("k", k, 1, integer=True)
    ranked = StreamedTopK(k)
    for start, block in _score_columns(curvature, query_data, train_data, **options):
        ranked.update(block, start)
    return ranked.result()


def _score_columns(
    curvature: Curvature,
    query_data: Iterable[Any],
    train_data: Iterable[Any],
    *,
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    query_loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    damping: float | None = None,
    damping_factor: float | None = None,
    normalize: str = "none",
    mask_fn: MaskFn | None = None,
    progress: bool = True,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first train index, (n_query, batch) score block)`` per training batch."""
    check_module("model", model)
    check_loss_fn("loss_fn", loss_fn)
    if query_loss_fn is not None:
        check_loss_fn("query_loss_fn", query_loss_fn)
    check_choice("normalize", normalize, NORMALIZATIONS)
    modules = curvature.tracked_modules(model)
    masks = mask_fn or default_mask
    query_loss_fn = query_loss_fn or loss_fn

    def flat_gradients(
        batch: Any, batch_loss: Callable[..., torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        with bias_in_curvature(curvature.includes_bias):
            return per_example_gradients(model, batch, batch_loss, modules, mask=masks(batch))

    def preconditioned(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return curvature.inverse_hvp(grads, damping, damping_factor=damping_factor)

    queries = []
    batches = tqdm(query_data, desc="queries", disable=not progress, leave=False)
    for index, batch in enumerate(batches):
        grads = flat_gradients(batch, query_loss_fn)
        if not all_finite(list(grads.values())):
            raise ValueError(
                f"Invalid query_data: batch {index} gives NaN or infinite gradients (check its "
                "inputs and the model's loss on it)"
            )
        if normalize == "unit":
            grads = _unit_normalized(grads)
        queries.append(_flatten(preconditioned(grads), modules))
    if not queries:
        raise ValueError("Invalid query_data: no batch (the iterable was empty)")
    preconditioned_queries = torch.cat(queries)

    start = 0
    batches = tqdm(train_data, desc="training examples", disable=not progress, leave=False)
    for index, batch in enumerate(batches):
        grads = flat_gradients(batch, loss_fn)
        if normalize == "unit":
            grads = _unit_normalized(grads)
        flat = _flatten(grads, modules)
        if not all_finite([flat]):
            raise ValueError(
                f"Invalid train_data: batch {index} gives NaN or infinite gradients (check its "
                "inputs and the model's loss on it)"
            )
        scores = preconditioned_queries @ flat.to(preconditioned_queries.dtype).T
        if normalize == "relative":
            self_influence = (_flatten(preconditioned(grads), modules) * flat).sum(-1)
            scores = scores / self_influence.clamp_min(torch.finfo(flat.dtype).tiny).sqrt()
        if not all_finite([scores]):
            raise ValueError(
                f"influence scores of train_data batch {index} overflowed to inf or NaN: "
                "increase the damping or rescale the loss"
            )
        yield start, scores
        start += scores.shape[1]
    if start == 0:
        raise ValueError("Invalid train_data: no batch (the iterable was empty)")


def top_k(scores: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the ``k`` highest (``largest=False``: lowest) scores and their train indices."""
    if scores.ndim != 2:
        raise ValueError(f"Invalid scores shape: {tuple(scores.shape)} (allowed: (queries, train))")
    check_range("k", k, 1, scores.shape[1], integer=True)
    result = torch.topk(scores, int(k), dim=1, largest=largest, sorted=True)
    return result.values, result.indices


def _flatten(grads: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> torch.Tensor:
    return torch.cat([grads[name].flatten(1) for name in modules], dim=1)


def _unit_normalized(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    squared = sum(grad.flatten(1).square().sum(1) for grad in grads.values())
    norms = squared.sqrt().clamp_min(torch.finfo(squared.dtype).tiny)
    return {
        name: grad / norms.reshape(-1, *([1] * (grad.ndim - 1))) for name, grad in grads.items()
    }
