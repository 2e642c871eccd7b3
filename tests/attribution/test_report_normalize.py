"""``normalize``: the score stage divides ⟨query row, training row⟩ by the training row's norm
(``train``) or by both rows' norms (``cosine``), checked against float64 definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kronlab.attribution.pipeline import AttributionConfig, AttributionRun, read_config
from tests.attribution.pipeline_fixtures import (
    inner_scores,
    oracle_gradients,
    oracle_inverse,
    tiny_task,
)


def _norms(blocks: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(block.double().square().sum((1, 2)) for block in blocks.values()).sqrt()


def _expected(normalize: str) -> torch.Tensor:
    """``⟨H⁻¹G_q, G_t⟩`` (K-FAC, full gradients), over ``‖G_t‖`` and ``‖H⁻¹G_q‖`` as asked."""
    task = tiny_task()
    queries = oracle_inverse(task, "kfac", damping=0.1)(oracle_gradients(task, task.queries))
    train = oracle_gradients(task, task.train)
    scores = inner_scores(queries, train)
    if normalize in ("train", "cosine"):
        scores = scores / _norms(train)[None, :]
    if normalize == "cosine":
        scores = scores / _norms(queries)[:, None]
    return scores


def _run(directory, normalize: str) -> AttributionRun:
    config = AttributionConfig(
        method="kfac",
        fisher="empirical",
        damping=0.1,
        projection_dim=0,
        compression="project",
        normalize=normalize,
        num_queries=6,
        batch_size=16,
        chunk_rows=16,
        top_k=3,
        report_queries=1,
    )
    return AttributionRun(directory, config, task=tiny_task(), show_progress=False)


@pytest.mark.parametrize("normalize", ["none", "train", "cosine"])
def test_normalized_scores_and_ranking_follow_the_definition(tmp_path, normalize) -> None:
    run = _run(tmp_path, normalize)
    scores = np.asarray(run.run())
    expected = _expected(normalize)
    np.testing.assert_allclose(
        scores, expected.numpy(), rtol=1e-3, atol=1e-3 * expected.abs().max()
    )
    ranked = run.top_k()
    np.testing.assert_array_equal(ranked.proponents, expected.argsort(1, descending=True)[:, :3])
    np.testing.assert_array_equal(ranked.opponents, expected.argsort(1)[:, :3])
    if normalize == "cosine":
        assert np.abs(scores).max() <= 1.0 + 1e-6
    assert f"normalize: {normalize}" in (tmp_path / "report.md").read_text()


def test_normalizing_by_the_training_norm_changes_the_ranking() -> None:
    # The definition itself reorders this problem's proponents, so a score stage that ignored
    # the setting would fail the test above.
    plain, normalized = _expected("none"), _expected("train")
    assert (plain.argmax(1) != normalized.argmax(1)).any()
    # cosine only rescales each query's row: the same ranking as train
    assert torch.equal(_expected("cosine").argsort(1), normalized.argsort(1))


def test_changing_normalize_makes_recorded_scores_stale(tmp_path) -> None:
    _run(tmp_path, "none").run()
    config_path = tmp_path / "config.json"
    config_path.write_text(config_path.read_text().replace('"none"', '"cosine"'))
    rerun = AttributionRun(
        tmp_path, read_config(config_path), task=tiny_task(), show_progress=False
    )
    with pytest.raises(ValueError, match="normalize: 'none' then, 'cosine' now"):
        rerun.run()
    rerun.score()  # the score stage alone recomputes them
    np.testing.assert_allclose(
        np.asarray(rerun.scores()), _expected("cosine").numpy(), rtol=1e-3, atol=1e-3
    )


def test_a_run_directory_is_scored_again_with_other_score_settings(tmp_path) -> None:
    _run(tmp_path, "none").run()
    rerun = _run(tmp_path, "cosine")  # the same directory, another score-stage setting
    assert read_config(tmp_path / "config.json").normalize == "cosine"
    np.testing.assert_allclose(
        np.asarray(rerun.run()), _expected("cosine").numpy(), rtol=1e-3, atol=1e-3
    )
    # A setting an earlier stage used stays pinned, and the refusal changes nothing.
    config = read_config(tmp_path / "config.json")
    other = AttributionConfig(**{**config.__dict__, "normalize": "train", "batch_size": 8})
    with pytest.raises(ValueError, match="batch_size: 16 in .*, 8 now"):
        AttributionRun(tmp_path, other, task=tiny_task(), show_progress=False)
    assert read_config(tmp_path / "config.json").normalize == "cosine"
