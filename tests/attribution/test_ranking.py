"""Streamed top-k proponents/opponents equal the top-k of the dense score matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kronlab.attribution import (
    cross_entropy_loss,
    fit_curvature,
    influence_scores,
    influence_top_k,
    top_k,
)
from kronlab.attribution.pipeline import AttributionConfig, AttributionRun
from kronlab.attribution.ranking import RankedScores, StreamedTopK
from kronlab.cli import build_parser

from .attribution_models import classification_batches, tiny_mlp
from .pipeline_fixtures import tiny_task


def _dense_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference from the definition: a full sort of each row."""
    order = np.argsort(-scores, axis=1)
    return order[:, :k], np.argsort(scores, axis=1)[:, :k]


def test_streamed_top_k_equals_dense_in_any_chunk_order_and_split(tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 103, generator=generator, dtype=torch.float64)
    bounds = [0, 7, 40, 41, 90, 103]
    chunks = [(bounds[i], scores[:, bounds[i] : bounds[i + 1]]) for i in range(len(bounds) - 1)]
    first, second = StreamedTopK(6), StreamedTopK(6)
    for start, block in reversed(chunks[:3]):
        first.update(block, start)
    for start, block in chunks[3:]:
        second.update(block, start)
    # A second worker's result, through its file.
    second.result().save(tmp_path / "part.npz")
    first.merge(RankedScores.load(tmp_path / "part.npz"))
    ranked = first.result()
    proponents, opponents = _dense_top_k(scores.numpy(), 6)
    np.testing.assert_array_equal(ranked.proponents, proponents)
    np.testing.assert_array_equal(ranked.opponents, opponents)
    np.testing.assert_allclose(
        ranked.proponent_scores, np.take_along_axis(scores.numpy(), proponents, 1), rtol=1e-6
    )
    np.testing.assert_allclose(
        ranked.opponent_scores, np.take_along_axis(scores.numpy(), opponents, 1), rtol=1e-6
    )
    assert ranked.num_train == 103 and ranked.k == 6


def test_streamed_top_k_rejects_bad_k_before_work() -> None:
    with pytest.raises(ValueError, match="k"):
        StreamedTopK(0)
    with pytest.raises(ValueError, match="no scores"):
        StreamedTopK(2).result()


def test_influence_top_k_equals_top_k_of_influence_scores() -> None:
    torch.manual_seed(0)
    model = tiny_mlp()
    inputs, targets = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    train = classification_batches(inputs, targets, 7)
    queries = classification_batches(inputs[:5] + 0.1, targets[:5], 5)
    curvature = fit_curvature(model, train, cross_entropy_loss, method="kfac", progress=False)
    common = dict(model=model, loss_fn=cross_entropy_loss, progress=False)
    dense = influence_scores(curvature, queries, train, **common)
    ranked = influence_top_k(curvature, queries, train, 4, **common)
    values, indices = top_k(dense, 4)
    np.testing.assert_array_equal(ranked.proponents, indices.numpy())
    np.testing.assert_allclose(ranked.proponent_scores, values.numpy(), rtol=1e-6)
    values, indices = top_k(dense, 4, largest=False)
    np.testing.assert_array_equal(ranked.opponents, indices.numpy())
    with pytest.raises(ValueError, match="k"):
        influence_top_k(curvature, queries, train, 0, **common)


def test_pipeline_score_without_scores_file_keeps_the_dense_top_k(tmp_path) -> None:
    settings = AttributionConfig(
        num_queries=6, batch_size=16, chunk_rows=16, fisher="empirical", top_k=4
    )
    run = AttributionRun(tmp_path, settings, task=tiny_task(), show_progress=False)
    scores = np.asarray(run.run())
    dense_ranked = run.top_k()
    proponents, opponents = _dense_top_k(scores, 4)
    np.testing.assert_array_equal(dense_ranked.proponents, proponents)
    np.testing.assert_array_equal(dense_ranked.opponents, opponents)

    # The same run directory scored again without scores.npy (not a pinned setting).
    (tmp_path / "score.json").unlink()
    (tmp_path / "scores.npy").unlink()
    streamed = AttributionRun(
        tmp_path, settings, task=tiny_task(), show_progress=False, dense_scores=False
    )
    ranked = streamed.run()
    assert isinstance(ranked, RankedScores) and not (tmp_path / "scores.npy").exists()
    np.testing.assert_array_equal(ranked.proponents, proponents)
    np.testing.assert_array_equal(ranked.opponents, opponents)
    np.testing.assert_allclose(ranked.opponent_scores, np.take_along_axis(scores, opponents, 1))
    assert "no scores.npy" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="no scores.npy"):
        streamed.scores()


def test_cli_flag_turns_the_scores_file_off() -> None:
    parser = build_parser()
    assert parser.parse_args(["attribute", "score", "--no-scores-file"]).no_scores_file
    assert not parser.parse_args(["attribute", "score"]).no_scores_file
