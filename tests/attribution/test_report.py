"""report.md: proponents and opponents by the sign of their scores, the settings recorded by the
stages, and how many queries are shown."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from kronlab.attribution.ranking import RankedScores
from kronlab.attribution.report import write_report
from kronlab.attribution.sources import AttributionTask, ExampleSet

COMPUTED_WITH = {
    "model_fingerprint": "m",
    "train_data_fingerprint": "t",
    "query_data_fingerprint": "q",
    "method": "ekfac",
    "fisher": "true",
    "curvature_fingerprint": "c",
    "damping": 0.1,
    "compression": "project",
    "projection_dim": 0,
    "projection_kind": "orthogonal",
    "store_dtype": "float32",
}


def _examples(count: int) -> ExampleSet:
    return ExampleSet((torch.zeros(count, 64), torch.arange(count) % 10), "vector")


def test_opponents_and_proponents_are_named_by_the_sign_of_their_score(tmp_path) -> None:
    # query 0: every score positive (no opponent); query 1: every score negative (no proponent)
    ranked = RankedScores(
        proponents=np.array([[3, 1], [0, 2]]),
        proponent_scores=np.array([[5.0, 2.0], [-0.5, -1.0]], dtype=np.float32),
        opponents=np.array([[0, 2], [4, 1]]),
        opponent_scores=np.array([[0.5, 1.0], [-7.0, -3.0]], dtype=np.float32),
        num_train=5,
    )
    task = AttributionTask(torch.nn.Identity(), lambda m, b: b, _examples(5), _examples(3))
    config = SimpleNamespace(model="m", data="d", queries="q", report_queries=2)
    write_report(tmp_path, COMPUTED_WITH, config, task, ranked)
    report = (tmp_path / "report.md").read_text()
    query_0, query_1 = report.split("## Query 0")[1].split("## Query 1")
    assert "| 1 | #3 label 3 | 5 | — | — |" in query_0
    assert "| 2 | #1 label 1 | 2 | — | — |" in query_0
    assert "| 1 | — | — | #4 label 4 | -7 |" in query_1
    assert "the first 2 of 2" not in report  # every query is shown
    # the model's class for each query (an identity on zero inputs predicts class 0)
    assert "## Query 0: label 0, predicted 0 (right)" in report
    assert "## Query 1: label 1, predicted 0 (wrong)" in report
