"""report.md: proponents and opponents by the sign of their scores, the settings recorded by the
stages, and how many queries are shown."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kronlab.attribution.ranking import RankedScores
from kronlab.attribution.report import _wrapped, write_report
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


def _png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def _text_examples(texts: list[str]) -> ExampleSet:
    tokens = torch.zeros(len(texts), 4, dtype=torch.long)
    return ExampleSet((tokens, torch.ones_like(tokens)), "text", texts)


def _ranked(queries: int, train: int, k: int) -> RankedScores:
    generator = np.random.default_rng(0)
    order = np.stack([generator.permutation(train) for _ in range(queries)])
    scores = np.linspace(2.0, -2.0, train, dtype=np.float32)[None].repeat(queries, 0)
    scores *= 10.0 ** np.arange(queries, dtype=np.float32)[:, None]  # 1e0 … 1e(queries-1)
    return RankedScores(
        proponents=order[:, :k],
        proponent_scores=scores[:, :k],
        opponents=order[:, ::-1][:, :k],
        opponent_scores=scores[:, ::-1][:, :k],
        num_train=train,
    )


def test_text_figure_has_a_bounded_width_and_wraps_whole_texts(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    words = "def attribute(model, data): return sorted(scores, key=abs)  # $x$ 50%"
    texts = [f"text {i}: " + " ".join([words] * (1 + i % 3)) + f"\nend {i}" for i in range(30)]
    task = AttributionTask(torch.nn.Identity(), lambda m, b: b, _text_examples(texts),
                           _text_examples(texts[:3]))  # fmt: skip
    config = SimpleNamespace(model="m", data="d", queries="q", report_queries=3)
    written = write_report(tmp_path, COMPUTED_WITH, config, task, _ranked(3, 30, 10))
    assert tmp_path / "top_examples.png" in written
    width, height = _png_size(tmp_path / "top_examples.png")
    # 10 examples a side used to be 21 columns of 3 inches (6930 px); now 12 inches at most.
    assert width <= 12 * 110 and height > width / 4
    # A text is wrapped to the column's width, not cut: every word of it is kept.
    lines = _wrapped(task.train, 0, "example")
    assert (
        max(map(len, lines)) <= 64
        and " ".join(lines).split() == texts[0].replace("\n", " ↵ ").split()
    )
    long_lines = _wrapped(task.train, 2, "example")
    assert len(long_lines) == 3 and long_lines[-1].endswith("…")


def test_report_says_how_scores_scale_and_how_to_normalize(tmp_path) -> None:
    task = AttributionTask(torch.nn.Identity(), lambda m, b: b, _examples(30), _examples(3))
    config = SimpleNamespace(model="m", data="d", queries="q", report_queries=3)
    write_report(tmp_path, COMPUTED_WITH, config, task, _ranked(3, 30, 2))
    report = " ".join((tmp_path / "report.md").read_text().split())
    # the largest |score| per query: 2, 20, 200
    assert "runs from 2 to 2e+02 (a factor 1e+02)" in report
    assert "orders of magnitude" in report and "--normalize cosine" in report
    assert "normalize: none" in report
    write_report(tmp_path, {**COMPUTED_WITH, "normalize": "cosine"}, config, task,
                 _ranked(3, 30, 2))  # fmt: skip
    report = " ".join((tmp_path / "report.md").read_text().split())
    assert "normalize: cosine" in report and "in [-1, 1] and comparable across queries" in report
