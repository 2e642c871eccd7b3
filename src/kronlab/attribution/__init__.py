"""Influence functions with K-FAC / EK-FAC curvature: fit, apply the inverse, score.

A few lines on any PyTorch model::

    curvature = fit_curvature(model, train_batches, cross_entropy_loss, method="ekfac")
    scores = influence_scores(curvature, query_batches, train_batches,
                              model=model, loss_fn=cross_entropy_loss)
    values, indices = top_k(scores, k=10)
"""

from kronlab.attribution.curvature import (
    CURVATURE_METHODS,
    FORMAT_VERSION,
    Curvature,
    ModuleCurvature,
)
from kronlab.attribution.damping_selection import DampingSelection, select_damping_factor
from kronlab.attribution.fit import cross_entropy_loss, default_mask, fit_curvature, mse_loss
from kronlab.attribution.fused import fused_activations
from kronlab.attribution.integrity import IntegrityError
from kronlab.attribution.pipeline import AttributionConfig, AttributionRun, StageMismatchError
from kronlab.attribution.ranking import RankedScores, StreamedTopK
from kronlab.attribution.scores import NORMALIZATIONS, influence_scores, influence_top_k, top_k
from kronlab.attribution.store import GradientStore, StoreMismatchError
from kronlab.curvature import find_modules, per_example_gradients

__all__ = [
    "AttributionConfig",
    "AttributionRun",
    "GradientStore",
    "IntegrityError",
    "StageMismatchError",
    "StoreMismatchError",
    "CURVATURE_METHODS",
    "FORMAT_VERSION",
    "NORMALIZATIONS",
    "RankedScores",
    "StreamedTopK",
    "Curvature",
    "DampingSelection",
    "ModuleCurvature",
    "cross_entropy_loss",
    "default_mask",
    "find_modules",
    "fit_curvature",
    "fused_activations",
    "influence_scores",
    "influence_top_k",
    "mse_loss",
    "per_example_gradients",
    "select_damping_factor",
    "top_k",
]
